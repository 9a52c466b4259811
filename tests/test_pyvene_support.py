from __future__ import annotations

import contextlib
import io

import pytest
import torch

from pyvene_harm.positions import ChatFormatter
from pyvene_harm.pyvene_support import HarmIntervenableModel, StateCollector, decoder_layers, pv

from hook_reference import states_by_hooks
from tiny import ARCHITECTURES, make_model, make_tokenizer


def _collector(model, layer):
    return HarmIntervenableModel(
        [{"layer": layer, "component": "block_input", "intervention_type": StateCollector}], model)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_block_input_matches_hooks(arch):
    model = make_model(arch)
    fmt = ChatFormatter(make_tokenizer("qwen2"))
    batch = fmt.encode(["hello there", "tell me a long story about bread and the sea"])
    ref = states_by_hooks(model, **batch.model_inputs())
    layer = 1
    im = _collector(model, layer)
    locs = torch.stack([batch.t_inst, batch.t_post_inst], 1).tolist()
    (_, acts), _ = im(batch.model_inputs(), unit_locations={"base": [locs]})
    for i in range(2):
        expected = ref[layer][i, locs[i]]
        torch.testing.assert_close(acts[0][i], expected)


def test_hidden_states_survive_a_pyvene_call(tiny_llama):
    ids = torch.tensor([[5, 6, 7, 8]])
    n = tiny_llama.config.num_hidden_layers
    im = _collector(tiny_llama, 0)
    im({"input_ids": ids}, unit_locations={"base": [[[1]]]})
    out = tiny_llama(input_ids=ids, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == n + 1


def test_other_hooks_survive_a_pyvene_call(tiny_llama):
    calls = []
    handle = decoder_layers(tiny_llama)[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        im = _collector(tiny_llama, 1)
        im({"input_ids": torch.tensor([[5, 6, 7]])}, unit_locations={"base": [[[1]]]})
        tiny_llama(input_ids=torch.tensor([[5, 6, 7]]))
        assert len(calls) == 2
    finally:
        handle.remove()


def test_scalar_location_does_not_make_later_calls_sticky(tiny_llama):
    ids = torch.tensor([[9, 10, 11, 12, 13], [20, 21, 22, 23, 24]])
    ref = states_by_hooks(tiny_llama, ids)[1]
    im = _collector(tiny_llama, 1)
    (_, first), _ = im({"input_ids": ids}, unit_locations={"base": 2})
    torch.testing.assert_close(first[0][:, 0], ref[:, 2])
    assert im.use_fast is False
    (_, acts), _ = im({"input_ids": ids}, unit_locations={"base": [[[1], [4]]]})
    torch.testing.assert_close(acts[0][0, 0], ref[0, 1])
    torch.testing.assert_close(acts[0][1, 0], ref[1, 4])


def test_plain_pyvene_collect_intervention_would_be_wrong(tiny_llama):
    """Why StateCollector exists: pyvene's own collector mangles several positions."""
    ids = torch.tensor([[9, 10, 11, 12, 13]])
    ref = states_by_hooks(tiny_llama, ids)[1]
    im = HarmIntervenableModel(
        [{"layer": 1, "component": "block_input", "intervention_type": pv.CollectIntervention}], tiny_llama)
    (_, acts), _ = im({"input_ids": ids}, unit_locations={"base": [[[1, 3]]]})
    assert acts[0].shape[-1] != ref.shape[-1] or not torch.allclose(acts[0][0, 1], ref[0, 3])


def test_importing_prints_nothing():
    import importlib

    import pyvene_harm

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        importlib.reload(pyvene_harm)
    assert buf.getvalue() == ""
