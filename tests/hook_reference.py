"""Plain PyTorch-hook references that the library's pyvene paths are checked against."""

from __future__ import annotations

import torch

from pyvene_harm.pyvene_support import decoder_layers


def states_by_hooks(model, input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> list[torch.Tensor]:
    """The L+1 states (each layer's input, then the last layer's output), via raw hooks."""
    layers = decoder_layers(model)
    seen: list[torch.Tensor] = []
    handles = []

    def pre(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.detach().clone())

    def post(_m, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen.append(h.detach().clone())

    for layer in layers:
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(post))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen
