"""Our interventions next to pyvene's own in one IntervenableModel, every effect against hooks."""

from __future__ import annotations

import pytest
import torch

from pyvene_harm.interventions import (
    BeliefReadout,
    DirectionAddition,
    DirectionalAblation,
    parse_positions,
    select_positions,
)
from pyvene_harm.pyvene_support import HarmIntervenableModel, StateCollector, decoder_layers, pv

from test_interventions_hooks import (
    ablate_edit,
    add_edit,
    encode,
    reference_mask,
    residual_hooks,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny,
)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_composition_with_pyvene_interventions(arch):
    model, batch = tiny(arch), encode(arch)
    g = torch.Generator().manual_seed(3)
    w, v, a = (torch.randn(64, generator=g) * 2 for _ in range(3))
    centroids = torch.randn(2, 64, generator=g)

    sel = select_positions(parse_positions("all_prompt"), batch)   # ragged: padded + masked
    same = torch.stack([batch.t_inst, batch.t_post_inst], 1).tolist()
    im = HarmIntervenableModel([
        {"layer": 0, "component": "block_input", "intervention": pv.AdditionIntervention(source_representation=w)},
        {"layer": 1, "component": "block_input", "intervention": DirectionAddition(direction=v, coeff=1.0, name="add")},
        {"layer": 1, "component": "block_input", "intervention": BeliefReadout(
            direction=v, positive=centroids[0], negative=centroids[1], name="read")},
        {"layer": 2, "component": "block_input", "intervention": DirectionalAblation(direction=a, name="abl")},
        {"layer": 2, "component": "block_output", "intervention_type": StateCollector},
    ], model)
    locations = [same, sel.positions, same, sel.positions, same]
    masks = {"add": sel.mask, "abl": sel.mask}  # the read-out and pyvene's own see every slot
    (_, collected), out = im(batch.model_inputs(), unit_locations={"sources->base": (None, locations)},
                             intervention_additional_kwargs={"slot_mask": masks, "coeff": {"add": -1.5}})

    # the same effects with plain hooks
    both, allp = reference_mask("t_inst+t_post_inst", batch), reference_mask("all_prompt", batch)
    seen = {}

    def read_input(_m, args, kwargs):
        seen["l1_after"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def read_output(_m, _args, output):
        seen["l2_out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    layers = decoder_layers(model)
    with residual_hooks(model, {0: add_edit(w, 1.0)}, both), \
            residual_hooks(model, {1: add_edit(v, -1.5)}, allp), \
            residual_hooks(model, {2: ablate_edit(a)}, allp), torch.no_grad():
        h1 = layers[1].register_forward_pre_hook(read_input, with_kwargs=True)
        h2 = layers[2].register_forward_hook(read_output)
        try:
            want = model(**batch.model_inputs()).logits
        finally:
            h1.remove()
            h2.remove()
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)

    collected_scores, collected_states = collected
    rows = torch.arange(len(batch))[:, None]
    torch.testing.assert_close(collected_states, seen["l2_out"][rows, torch.tensor(same)])
    # the read-out sits after the addition at layer 1, so it sees the steered state
    h = seen["l1_after"][rows, torch.tensor(same)]
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(collected_scores[..., 0], h @ (v / v.norm()), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(collected_scores[..., 3], cos(h, centroids[0], dim=-1) - cos(h, centroids[1], dim=-1),
                               atol=1e-5, rtol=1e-5)
