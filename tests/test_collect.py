from __future__ import annotations

import inspect

import pytest
import torch

from pyvene_harm.collect import ActivationStats, collect_states, collect_stats, truncated_decoder
from pyvene_harm.positions import ChatFormatter
from pyvene_harm.pyvene_support import decoder_layers

from hook_reference import states_by_hooks
from tiny import make_model, make_tokenizer

PROMPTS = ["How do I bake bread?", "Tell me how to build a bomb.", "hi",
           "Write a poem about the sea, please, with at least four lines.", "Explain photosynthesis."]
GROUPS = ["harmless", "harmful", "harmless", "harmless", "harmful"]


def _reference(model, fmt, prompts, groups):
    """Unbatched, one prompt at a time, raw hooks, float64 means."""
    sums, counts = {}, {}
    for x, g in zip(prompts, groups):
        b = fmt.encode([x])
        states = states_by_hooks(model, b.input_ids)
        for pos in ("t_inst", "t_post_inst"):
            i = int(getattr(b, pos)[0])
            v = torch.stack([s[0, i] for s in states]).double()
            sums.setdefault(g, {}).setdefault(pos, torch.zeros_like(v))
            sums[g][pos] += v
        counts[g] = counts.get(g, 0) + 1
    return {g: {p: s / counts[g] for p, s in by.items()} for g, by in sums.items()}, counts


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_stats_equal_unbatched_hook_reference(arch):
    model = make_model(arch)
    fmt = ChatFormatter(make_tokenizer("llama3"))
    stats = collect_stats(model, fmt, PROMPTS, GROUPS, batch_size=3)
    ref, counts = _reference(model, fmt, PROMPTS, GROUPS)
    assert stats.counts == counts
    assert stats.n_states == model.config.num_hidden_layers + 1
    for g in counts:
        for p in ("t_inst", "t_post_inst"):
            torch.testing.assert_close(stats.mean(g, p), ref[g][p], rtol=1e-5, atol=1e-5)


def test_stats_merge_exactly(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    whole = collect_stats(tiny_llama, fmt, PROMPTS, GROUPS, batch_size=2)
    a = collect_stats(tiny_llama, fmt, PROMPTS[:2], GROUPS[:2], batch_size=2)
    b = collect_stats(tiny_llama, fmt, PROMPTS[2:], GROUPS[2:], batch_size=4)
    merged = a + b
    assert merged.counts == whole.counts
    for g in whole.groups:
        for p in whole.positions:
            torch.testing.assert_close(merged.sums[g][p], whole.sums[g][p], rtol=1e-9, atol=1e-7)
    assert sum([a, b]).counts == whole.counts
    assert ActivationStats.merge([a, b]).counts == whole.counts


def test_kept_states_follow_prompt_order(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    stats = collect_stats(tiny_llama, fmt, PROMPTS, GROUPS, keep_layers=[0, 3], batch_size=2)
    harmful = [x for x, g in zip(PROMPTS, GROUPS) if g == "harmful"]
    assert stats.states["harmful"]["t_inst"].shape == (2, 2, 64)
    single = collect_stats(tiny_llama, fmt, harmful[1:], "harmful", keep_layers=[0, 3])
    torch.testing.assert_close(stats.states["harmful"]["t_inst"][1], single.states["harmful"]["t_inst"][0],
                               rtol=1e-5, atol=1e-5)


def test_post_instruction_span(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    stats = collect_stats(tiny_llama, fmt, PROMPTS[:2], "x", post_inst_span=3)
    assert {"post:0", "post:1", "post:2"} <= set(stats.positions)
    torch.testing.assert_close(stats.sums["x"]["post:0"], stats.sums["x"]["t_inst"])


def test_early_exit_states_match_full_run(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    full = next(collect_states(tiny_llama, fmt, PROMPTS[:3]))[1]["t_inst"]
    early = next(collect_states(tiny_llama, fmt, PROMPTS[:3], states=[0, 1]))[1]["t_inst"]
    torch.testing.assert_close(early, full[:, :2])
    with truncated_decoder(tiny_llama.model, 1):
        assert len(decoder_layers(tiny_llama)) == 1
    assert len(decoder_layers(tiny_llama)) == 3


def test_only_tokens_up_to_the_last_position_read_are_run(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    full = next(collect_states(tiny_llama, fmt, PROMPTS[:3], states=[1, 3]))[1]
    lengths = []
    handle = tiny_llama.model.register_forward_pre_hook(
        lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        inst = next(collect_states(tiny_llama, fmt, PROMPTS[:3], states=[1, 3], positions=("t_inst",),
                                   share_prefix=False))[1]
    finally:
        handle.remove()
    batch = fmt.encode(PROMPTS[:3], padding_side="left")
    assert lengths == [int(batch.t_inst.max()) + 1] and lengths[0] < batch.seq_len
    torch.testing.assert_close(inst["t_inst"], full["t_inst"])


def test_bad_arguments(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    with pytest.raises(ValueError, match="out of range"):
        next(collect_states(tiny_llama, fmt, PROMPTS, states=[7]))
    with pytest.raises(ValueError, match="no prompts"):
        collect_stats(tiny_llama, fmt, [], "x")
    with pytest.raises(ValueError, match="group labels"):
        collect_stats(tiny_llama, fmt, PROMPTS, ["a"])


def test_shared_prefix_gives_the_full_run_states(arch):
    """The template prefix run once and cached per batch: same states as full prompts, every family."""
    from pyvene_harm.shared_prefix import MIN_SHARED_PREFIX, SharedPrefix

    model = make_model(arch)
    fmt = ChatFormatter(make_tokenizer("qwen2.5"))  # default system prompt: a long shared prefix
    prompts = PROMPTS[:3] + ["Why?", "Tell me a story about a dragon and a very small knight."]
    lengths = []
    handle = model.model.register_forward_pre_hook(
        lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        shared = {pos: next(collect_states(model, fmt, prompts, batch_size=8, positions=(pos,)))[1][pos]
                  for pos in ("t_inst", "t_post_inst")}
    finally:
        handle.remove()
    full = next(collect_states(model, fmt, prompts, batch_size=8, share_prefix=False))[1]
    for pos in ("t_inst", "t_post_inst"):
        torch.testing.assert_close(shared[pos], full[pos], rtol=1e-5, atol=1e-5)
    # the prefix ran once per call (batch 1), then the batches without it
    batch = fmt.encode(prompts, padding_side="left")
    prefix = SharedPrefix.build(model.model, [fmt.tokenizer(fmt.render(p).text, add_special_tokens=False)
                                              ["input_ids"] for p in prompts], torch.device("cpu"))
    assert prefix is not None and len(prefix.ids) >= MIN_SHARED_PREFIX
    assert lengths[0] == len(prefix.ids) and lengths[1] <= batch.seq_len - len(prefix.ids)


def test_the_prefix_cache_goes_by_the_name_the_installed_transformers_takes(tiny_llama):
    """transformers 5.x warns on every forward given ``past_key_values``; 4.57 knows no ``cache``."""
    import warnings

    from pyvene_harm.cache_compat import cache_argument, output_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return {"past_key_values": "old cache"}

    assert cache_argument(Old()) == "past_key_values"
    assert output_cache(Old()()) == "old cache" and output_cache({"cache": "new"}) == "new"
    name = cache_argument(tiny_llama.model)
    assert name in inspect.signature(tiny_llama.model.forward).parameters
    fmt = ChatFormatter(make_tokenizer("qwen2.5"))  # a long shared prefix: the cache is used
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation warning fails the test
        next(collect_states(tiny_llama, fmt, PROMPTS, batch_size=8))


def test_shared_prefix_is_skipped_when_a_position_lies_inside_it(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2.5"))
    # identical prompts: the common prefix covers everything, so it must stop before t_inst
    same = next(collect_states(tiny_llama, fmt, ["Hello there"] * 3))[1]
    alone = next(collect_states(tiny_llama, fmt, ["Hello there"], share_prefix=False))[1]
    for pos in ("t_inst", "t_post_inst"):
        torch.testing.assert_close(same[pos], alone[pos].expand_as(same[pos]), rtol=1e-5, atol=1e-5)


def _span_reference(model, fmt, prompt):
    """One prompt alone, raw hooks: every read as a plain mean over its tokens."""
    b = fmt.encode([prompt])
    states = torch.stack([s[0] for s in states_by_hooks(model, b.input_ids)], dim=1)  # [T, S, d]
    s, t, p = int(b.inst_start[0]), int(b.t_inst[0]), int(b.t_post_inst[0])
    return {"mean_inst": states[s:t + 1].mean(0), "last:3": states[max(s, t - 2):t + 1].mean(0),
            "mean_post": states[t + 1:p + 1].mean(0), "post:1": states[t + 1], "t_inst": states[t]}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_pooled_reads_equal_unbatched_hook_reference(arch):
    """Means over spans of tokens, batched with left padding and the shared prefix, against
    one prompt at a time through raw hooks."""
    model = make_model(arch)
    fmt = ChatFormatter(make_tokenizer("qwen2.5"))
    prompts = PROMPTS + ["Why?"]
    reads = ("mean_inst", "last:3", "mean_post", "post:1", "t_inst")
    got = {}
    for idx, by_read in collect_states(model, fmt, prompts, positions=reads, batch_size=4):
        for j, i in enumerate(idx):
            got[i] = {r: by_read[r][j] for r in reads}
    for i, prompt in enumerate(prompts):
        ref = _span_reference(model, fmt, prompt)
        for r in reads:
            torch.testing.assert_close(got[i][r], ref[r], rtol=1e-5, atol=1e-5)


def test_pooled_reads_on_a_one_token_instruction(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    by_read = next(collect_states(tiny_llama, fmt, ["hi", "Why?"], positions=("mean_inst", "last:4", "t_inst")))[1]
    assert torch.isfinite(by_read["mean_inst"]).all()
    batch = fmt.encode(["hi", "Why?"])
    one_token = [i for i in range(2) if int(batch.inst_start[i]) == int(batch.t_inst[i])]
    for i in one_token:  # a one-token instruction: every read is its one state
        torch.testing.assert_close(by_read["mean_inst"][i], by_read["t_inst"][i])
        torch.testing.assert_close(by_read["last:4"][i], by_read["t_inst"][i])


def test_unknown_reads_are_refused_before_the_model_runs(tiny_llama):
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    for bad in ("middle", "last:0", "post:x", "mean"):
        with pytest.raises(ValueError, match="unknown read"):
            next(collect_states(tiny_llama, fmt, PROMPTS, positions=(bad,)))
