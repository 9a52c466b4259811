"""How deep a forward pass runs: the bare decoder under a causal LM, run or kept cut short.

Reading state k needs only decoder layers 0 .. k-1, so collection, the guard and a scoring-only
server run (or keep) just those. The layer list is swapped, never the weights moved, and a copy
cut short still reports the full depth in its provenance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .pyvene_support import decoder_layers, layers_path

__all__ = ["decoder_of", "drop_unread_layers", "layers_to_run", "mark_full_depth", "truncated_decoder"]


def decoder_of(model: nn.Module) -> nn.Module:
    """The bare decoder (no language-model head) under a causal LM.

    Collection and scoring need hidden states only; skipping the head saves the largest matrix
    multiply of small models (a 150k-word vocabulary on Qwen).
    """
    path = layers_path(model)
    if path.endswith(".layers") and path != "layers":
        inner = model
        for part in path.split(".")[:-1]:
            inner = getattr(inner, part)
        return inner
    return model


@contextlib.contextmanager
def truncated_decoder(decoder: nn.Module, n_layers: int) -> Iterator[nn.Module]:
    """Run only the first ``n_layers`` decoder layers (the guard's early exit).

    The layer list is swapped for a shorter one and restored in ``finally``; no weights move.
    """
    layers = decoder_layers(decoder)
    if n_layers >= len(layers):
        yield decoder
        return
    _set_layers(decoder, nn.ModuleList(list(layers)[:n_layers]))
    try:
        yield decoder
    finally:
        _set_layers(decoder, layers)


def _set_layers(decoder: nn.Module, layers: nn.ModuleList) -> None:
    """Put ``layers`` where the decoder keeps its layer list."""
    holder = decoder
    path = layers_path(decoder).split(".")
    for part in path[:-1]:
        holder = getattr(holder, part)
    setattr(holder, path[-1], layers)


def drop_unread_layers(model: nn.Module, states: Sequence[int]) -> int:
    """Delete the decoder layers that reading ``states`` never runs; returns how many are kept.

    For a model that only scores (a guard server whose replies come from a serving engine): a
    guard reading states up to 2/3 of the depth keeps 2/3 of the layers, and the rest of their
    weights are freed. The model can no longer generate. Its provenance still reports the full
    depth (``pyvene_harm_num_layers``), so artifacts made for the whole model still fit it.
    """
    decoder = decoder_of(model)
    layers = decoder_layers(decoder)
    n = getattr(model, "pyvene_harm_num_layers", len(layers))
    keep = layers_to_run(len(layers), states)
    if keep < len(layers):
        _set_layers(decoder, nn.ModuleList(list(layers)[:keep]))
    mark_full_depth(model, n)
    return keep


def mark_full_depth(model: nn.Module, n_layers: int) -> None:
    """Record that ``model`` stands for a model of ``n_layers`` decoder layers, whatever it
    holds now: provenance (:func:`~pyvene_harm.directions.model_provenance`) reports that depth,
    so a guard or directions made for the whole model still fit a copy cut short."""
    decoder = decoder_of(model)
    for mod in {id(model): model, id(decoder): decoder}.values():
        mod.pyvene_harm_num_layers = n_layers


def layers_to_run(n_layers: int, states: Sequence[int]) -> int:
    """Decoder layers a collection of ``states`` runs: the input of layer k is the output of
    layer k - 1, so layers k and above never need to run (at least one always does)."""
    return min(n_layers, max(1, max(states)))
