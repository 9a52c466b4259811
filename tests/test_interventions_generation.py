"""The three generation modes against plain hooks, on every architecture and selector.

- prompt positions only (``generated=False``);
- every prompt and generated position (``positions="all_prompt", generated=True``);
- selected prompt positions plus every generated token (any selector, ``generated=True``).
"""

from __future__ import annotations

import pytest
import torch

from pyvene_harm.generation import generate_replies
from pyvene_harm.interventions import ablate, parse_positions, steer

from test_interventions_hooks import (
    PROMPTS,
    SELECTORS,
    ablate_edit,
    add_edit,
    assert_same_generation,
    encode,
    formatter,
    greedy,
    hook_generate,
    random_directions,
    reference_mask,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny,
)
from tiny import ARCHITECTURES

ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("generated", [False, True], ids=["prompt_only", "plus_generated"])
def test_every_selector_and_mode_matches_hooks(arch, generated):
    model, ds, batch, config = tiny(arch), random_directions(), encode(arch), greedy(3)
    v = ds.direction("harmfulness", 1)
    s = steer(model, ds, layer=1, coeff=2.0, generated=generated)
    with torch.no_grad():
        plain = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               generation_config=config)
    for spec in SELECTORS:
        s.positions = parse_positions(spec)
        s.generated = generated or spec == "generated"
        with torch.no_grad():
            got = s.generate(batch, config)
        want = hook_generate(model, batch, {1: add_edit(v, 2.0)}, reference_mask(spec, batch),
                             generated=s.generated, config=config)
        assert_same_generation(got, want)
        effect = (torch.stack(got.logits) - torch.stack(plain.logits)).abs().max()
        assert effect > 1e-4, f"{spec}: steering had no effect ({effect})"


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "olmo2"])
def test_batched_left_padding_equals_per_example(arch):
    model, ds, config = tiny(arch), random_directions(), greedy(3)
    for spec, generated in (("t_inst+t_post_inst", False), ("context", True), ("all_prompt", True)):
        s = steer(model, ds, direction="refusal", layer=1, coeff=-2.0, positions=spec, generated=generated)
        with torch.no_grad():
            batched = s.generate(encode(arch), config)
            for i, prompt in enumerate(PROMPTS):
                one = s.generate(encode(arch, [prompt]), config)
                n_new = len(one.logits)
                assert batched.sequences[i, -n_new:].tolist() == one.sequences[0, -n_new:].tolist()
                for a, b in zip(batched.logits, one.logits):
                    torch.testing.assert_close(a[i], b[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_ablation_during_generation_matches_hooks(arch):
    model, ds, batch, config = tiny(arch), random_directions(), encode(arch), greedy(3)
    s = ablate(model, ds, direction="refusal", layers=[0, 2])
    edits = {lay: ablate_edit(ds.direction("refusal", lay)) for lay in (0, 2)}
    with torch.no_grad():
        got = s.generate(batch, config)
    want = hook_generate(model, batch, edits, reference_mask("all_prompt", batch), generated=True, config=config)
    assert_same_generation(got, want)


def test_coeff_per_generate_call_and_generate_replies():
    model, ds, batch, config = tiny("llama"), random_directions(), encode("llama"), greedy(3)
    s = steer(model, ds, layer=1, coeff=0.0, positions="all_prompt", generated=True)
    v, mask = ds.direction("harmfulness", 1), reference_mask("all_prompt", batch)
    with torch.no_grad():
        got = s.generate(batch, config, coeff=3.0)
    assert_same_generation(got, hook_generate(model, batch, {1: add_edit(v, 3.0)}, mask, generated=True,
                                              config=config))
    ids = s.generate_batch(batch, config, coeff=3.0)
    assert ids.tolist() == got.sequences.tolist()
    # the generate_replies hook: same replies as the hook reference, in prompt order
    s.set_coeff(3.0)
    fmt = formatter("llama")
    replies = generate_replies(model, fmt, PROMPTS, max_new_tokens=3, batch_size=2, wrapper=None, steer=s)
    assert len(replies) == len(PROMPTS)
