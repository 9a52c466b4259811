"""Intervention classes, position selectors and one-call builders, checked against plain hooks."""

from __future__ import annotations

import pytest
import torch

from pyvene_harm.interventions import (
    BeliefReadout,
    DirectionAddition,
    DirectionalAblation,
    Site,
    Steering,
    ablate,
    parse_positions,
    prompt_mask,
    readout,
    select_positions,
    selector_names,
    steer,
    t_inst,
    t_post_inst,
    union,
)
from pyvene_harm.pyvene_support import HarmIntervenableModel

from test_interventions_hooks import (
    SELECTORS,
    ablate_edit,
    add_edit,
    encode,
    hook_forward,
    random_directions,
    reference_mask,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny,
)
from tiny import ARCHITECTURES

ARCHS = sorted(ARCHITECTURES)
PROMPT_SELECTORS = [s for s in SELECTORS if s != "generated"]

# --- selectors --------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("spec", SELECTORS)
def test_selectors_match_the_batch_fields(spec, padding_side):
    batch = encode("llama", padding_side=padding_side)
    want = reference_mask(spec, batch)
    got = parse_positions(spec)(batch)
    assert got == [torch.nonzero(row).flatten().tolist() for row in want]
    assert (prompt_mask(parse_positions(spec), batch) > 0).equal(want)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_ragged_selection_pads_with_unselected_positions(padding_side):
    batch = encode("llama", padding_side=padding_side)
    sel = select_positions(parse_positions("all_prompt"), batch)
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) > 1, "the test needs a ragged batch"
    assert sel.n_slots == max(lengths)
    for i, row in enumerate(sel.positions):
        assert len(row) == len(set(row)) == sel.n_slots  # no position twice: nothing applied twice
        real = [p for p, m in zip(row, sel.mask[i].tolist()) if m]
        pads = [p for p, m in zip(row, sel.mask[i].tolist()) if not m]
        assert real == torch.nonzero(batch.attention_mask[i]).flatten().tolist()
        assert not set(pads) & set(real)


def test_union_and_parse():
    batch = encode("llama")
    both = union(t_inst(), t_post_inst())
    assert both.name == "t_inst+t_post_inst" and (t_inst() | t_post_inst()).name == both.name
    assert both(batch) == parse_positions("t_post_inst+t_inst")(batch)
    assert parse_positions("all_prompt+generated").generated
    custom = parse_positions(lambda b: [[0]] * len(b))
    assert callable(custom)


def test_unknown_selector_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown position selector 'last'") as err:
        parse_positions("t_inst+last")
    for name in selector_names():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        steer(tiny("llama"), random_directions(), layer=1, positions="everything")


def test_selector_out_of_range_is_a_clear_error():
    batch = encode("llama")
    with pytest.raises(ValueError, match="outside the padded sequence"):
        select_positions(lambda b: [[-1]] * len(b), batch)


# --- the classes themselves ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vector_follows_the_state_dtype_and_device(dtype):
    v = torch.randn(8)
    base = torch.randn(2, 3, 8).to(dtype)
    add = DirectionAddition(direction=v, coeff=-1.5)
    out = add(base)
    assert out.dtype == dtype and add.direction.dtype == torch.float32
    torch.testing.assert_close(out, base + (-1.5 * v).to(dtype))
    abl = DirectionalAblation(direction=v)(base)
    assert abl.dtype == dtype
    assert (abl.float() @ (v / v.norm())).abs().max() < (0.05 if dtype != torch.float32 else 1e-5)
    meta = add(torch.empty(2, 3, 8, device="meta", dtype=dtype))
    assert meta.device.type == "meta" and meta.dtype == dtype


def test_masks_leave_unselected_slots_bit_identical():
    base = torch.randn(2, 3, 8)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    for iv in (DirectionAddition(direction=torch.randn(8)), DirectionalAblation(direction=torch.randn(8))):
        out = iv(base.clone(), slot_mask=mask)
        assert torch.equal(out[mask == 0], base[mask == 0])
        assert not torch.equal(out[mask == 1], base[mask == 1])
    with pytest.raises(ValueError, match="slot_mask has shape"):
        DirectionAddition(direction=torch.randn(8))(base, slot_mask=mask[:, :2])


def test_coeff_per_call_per_example_and_by_name():
    v, base = torch.randn(8), torch.zeros(2, 1, 8)
    add = DirectionAddition(direction=v, coeff=1.0, name="a")
    torch.testing.assert_close(add(base, coeff=3.0)[0, 0], 3 * v)
    per = add(base, coeff=torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(per[1, 0], -2 * v)
    torch.testing.assert_close(add(base, coeff={"a": 0.5, "b": 9.0})[0, 0], 0.5 * v)
    torch.testing.assert_close(add(base, coeff={"b": 9.0})[0, 0], v)  # not addressed: its default


def test_belief_readout_scores():
    v, pos, neg = torch.randn(8), torch.randn(8), torch.randn(8)
    h = torch.randn(2, 2, 8)
    rd = BeliefReadout(direction=v, positive=pos, negative=neg)
    s = rd(h, slot_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(s[0, 1, 0], h[0, 1] @ (v / v.norm()))
    torch.testing.assert_close(s[0, 1, 3], cos(h[0, 1], pos, dim=0) - cos(h[0, 1], neg, dim=0))
    assert torch.isnan(s[1, 1]).all() and not torch.isnan(s[:, 0]).any()


# --- builders against hooks, every architecture x selector, both padding sides ---------------


@pytest.mark.parametrize("arch", ARCHS)
def test_steer_forward_matches_hooks_for_every_selector(arch):
    model, ds = tiny(arch), random_directions()
    v = ds.direction("refusal", 1)
    for padding_side in ("left", "right"):
        batch = encode(arch, padding_side=padding_side)
        with torch.no_grad():
            plain = model(**batch.model_inputs()).logits
        s = steer(model, ds, direction="refusal", layer=1, coeff=2.0, positions="all_prompt")
        for spec in PROMPT_SELECTORS:
            s.positions = parse_positions(spec)
            with torch.no_grad():
                got = s.forward(batch).logits
            want = hook_forward(model, batch, {1: add_edit(v, 2.0)}, reference_mask(spec, batch))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(got, plain, atol=1e-3), f"{spec}: steering had no effect"


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_coeff_changes_per_call_without_rebuilding(arch):
    model, ds, batch = tiny(arch), random_directions(), encode(arch)
    s = steer(model, ds, direction="harmfulness", layer=2, coeff=1.0, positions="t_inst+t_post_inst")
    im = s.intervenable
    v, mask = ds.direction("harmfulness", 2), reference_mask("t_inst+t_post_inst", batch)
    with torch.no_grad():
        for c in (-3.0, 0.5):
            torch.testing.assert_close(s.forward(batch, coeff=c).logits,
                                       hook_forward(model, batch, {2: add_edit(v, c)}, mask), atol=1e-5, rtol=1e-5)
        s.set_coeff(-1.0)
        assert s.intervenable is im and s.coeff == -1.0
        torch.testing.assert_close(s.forward(batch).logits,
                                   hook_forward(model, batch, {2: add_edit(v, -1.0)}, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_ablate_every_layer_matches_hooks(arch):
    model, ds = tiny(arch), random_directions()
    for padding_side in ("left", "right"):
        batch = encode(arch, padding_side=padding_side)
        mask = reference_mask("all_prompt", batch)
        per_layer = ablate(model, ds, direction="refusal")
        assert per_layer.layers == (0, 1, 2)
        edits = {lay: ablate_edit(ds.direction("refusal", lay)) for lay in range(3)}
        with torch.no_grad():
            torch.testing.assert_close(per_layer.forward(batch).logits, hook_forward(model, batch, edits, mask),
                                       atol=1e-5, rtol=1e-5)
        one = ablate(model, ds, direction="refusal", layers=[0, 2], source_layer=1)
        edits = {lay: ablate_edit(ds.direction("refusal", 1)) for lay in (0, 2)}
        with torch.no_grad():
            torch.testing.assert_close(one.forward(batch).logits, hook_forward(model, batch, edits, mask),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_match_hooks(dtype):
    model = tiny("llama").to(dtype)
    try:
        ds, batch = random_directions(), encode("llama")
        v, mask = ds.direction("harmfulness", 1), reference_mask("all_prompt", batch)
        s = steer(model, ds, layer=1, coeff=1.5)
        with torch.no_grad():
            got = s.forward(batch).logits
        assert got.dtype == dtype
        torch.testing.assert_close(got, hook_forward(model, batch, {1: add_edit(v, 1.5)}, mask))
        abl = ablate(model, ds, layers=1)
        with torch.no_grad():
            torch.testing.assert_close(abl.forward(batch).logits,
                                       hook_forward(model, batch, {1: ablate_edit(ds.direction("refusal", 1))}, mask))
    finally:
        model.to(torch.float32)


def test_readout_matches_hook_states():
    from hook_reference import states_by_hooks

    model, ds, batch = tiny("qwen2"), random_directions(), encode("qwen2")
    r = readout(model, ds, direction="harmfulness")
    assert r.states == (0, 1, 2, 3)
    got = r.forward(batch)
    states = states_by_hooks(model, **batch.model_inputs())
    cos = torch.nn.functional.cosine_similarity
    want = torch.stack([
        cos(states[s][torch.arange(len(batch)), batch.t_inst], ds.centroids["harmful"][s], dim=-1)
        - cos(states[s][torch.arange(len(batch)), batch.t_inst], ds.centroids["harmless"][s], dim=-1)
        for s in range(4)
    ]).mean(0)
    torch.testing.assert_close(got.belief()[:, 0], want, atol=1e-5, rtol=1e-5)
    ragged = readout(model, ds, direction="refusal", layers=2, positions="post_inst").forward(batch)
    assert ragged.scores.shape[:2] == (1, len(batch)) and torch.isnan(ragged.column("delta")[~ragged.mask[None]]).all()


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_errors():
    model, ds = tiny("llama"), random_directions()
    with pytest.raises(ValueError, match=r"layer 40 is out of range: this model has 3 decoder layers \(0-2\)"):
        steer(model, ds, layer=40)
    with pytest.raises(ValueError, match="hidden_size: directions 32, model 64"):
        steer(model, random_directions(hidden=32), layer=1)
    with pytest.raises(ValueError, match="unknown direction 'harm'"):
        steer(model, ds, layer=1, direction="harm")
    with pytest.raises(ValueError, match="only ablates"):
        ablate(model, ds).set_coeff(2.0)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        readout(model, ds, layers=5)
    with pytest.raises(ValueError, match="hidden size is 64"):
        Steering(model, [Site(layer=0, intervention=DirectionAddition(direction=torch.ones(32)))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_model_with_cpu_directions():
    model = tiny("llama").to("cuda", torch.bfloat16)
    try:
        ds, batch = random_directions(), encode("llama").to("cuda")
        v, mask = ds.direction("refusal", 1), reference_mask("all_prompt", batch.to("cpu"))
        s = steer(model, ds, direction="refusal", layer=1, coeff=1.5)
        with torch.no_grad():
            got = s.forward(batch).logits
        assert got.device.type == "cuda" and s.interventions[0].direction.device.type == "cpu"
        torch.testing.assert_close(got, hook_forward(model, batch, {1: add_edit(v, 1.5)}, mask))
    finally:
        model.to("cpu", torch.float32)


def test_interventions_work_in_a_plain_pyvene_model():
    model, batch = tiny("mistral"), encode("mistral")
    v = torch.randn(64)
    im = HarmIntervenableModel([{"layer": 1, "component": "block_input",
                                 "intervention": DirectionAddition(direction=v, coeff=2.0)}], model)
    locs = torch.stack([batch.t_inst, batch.t_post_inst], 1).tolist()
    _, out = im(batch.model_inputs(), unit_locations={"sources->base": (None, [locs])})
    want = hook_forward(model, batch, {1: add_edit(v, 2.0)}, reference_mask("t_inst+t_post_inst", batch))
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
