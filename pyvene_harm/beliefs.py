"""Delta_harmful and Delta_refuse: a model's own beliefs, read from one prefill.

Delta(x) = mean over layers of [cos(h^l(x), mu^l_pos) - cos(h^l(x), mu^l_neg)], at t_inst with
the harmful / harmless centroids (Delta_harmful) and at t_post_inst with the refused / accepted
centroids (Delta_refuse). Positive means "harmful" / "will refuse". The paper averages over all
L+1 states; any subset can be chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import cosine_similarity

from .collect import collect_states
from .directions import DirectionSet
from .positions import ChatFormatter

__all__ = ["Beliefs", "belief_per_layer", "compute_beliefs", "delta_harmful", "delta_refuse", "resolve_layers"]


def resolve_layers(directions: DirectionSet, layers: Sequence[int] | None) -> list[int]:
    """The state indices to average over (all L+1 by default), validated."""
    if layers is None:
        return list(range(directions.n_states))
    out = sorted(set(int(layer) for layer in layers))
    if not out:
        raise ValueError("empty layer set: choose at least one layer")
    for layer in out:
        directions.check_layer(layer)
    return out


def belief_per_layer(states: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """``[n, S]`` cosine gap of states ``[n, S, d]`` to two centroids ``[S, d]``."""
    states = states.double()
    return (cosine_similarity(states, positive.double().unsqueeze(0), dim=-1)
            - cosine_similarity(states, negative.double().unsqueeze(0), dim=-1))


def delta_harmful(directions: DirectionSet, states_t_inst: torch.Tensor,
                  layers: Sequence[int] | None = None) -> torch.Tensor:
    """Delta_harmful per prompt from states ``[n, len(layers), d]`` taken at t_inst."""
    idx = resolve_layers(directions, layers)
    c = directions.centroids
    return belief_per_layer(states_t_inst, c["harmful"][idx], c["harmless"][idx]).mean(-1)


def delta_refuse(directions: DirectionSet, states_t_post_inst: torch.Tensor,
                 layers: Sequence[int] | None = None) -> torch.Tensor:
    """Delta_refuse per prompt from states ``[n, len(layers), d]`` taken at t_post_inst."""
    idx = resolve_layers(directions, layers)
    c = directions.centroids
    return belief_per_layer(states_t_post_inst, c["refused"][idx], c["accepted"][idx]).mean(-1)


@dataclass(frozen=True)
class Beliefs:
    """Per-prompt beliefs; ``per_layer_*`` has shape ``[n, len(layers)]``."""

    delta_harmful: torch.Tensor
    delta_refuse: torch.Tensor
    per_layer_harmful: torch.Tensor
    per_layer_refuse: torch.Tensor
    layers: tuple[int, ...]

    def rows(self, prompts: Sequence[str] | None = None) -> list[dict]:
        return [
            {**({"prompt": prompts[i]} if prompts is not None else {}),
             "delta_harmful": float(self.delta_harmful[i]), "delta_refuse": float(self.delta_refuse[i])}
            for i in range(len(self.delta_harmful))
        ]


def compute_beliefs(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    directions: DirectionSet,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    wrapper: str | None = None,
    progress: bool | str | None = None,
) -> Beliefs:
    """Delta_harmful and Delta_refuse for each prompt (one partial prefill per batch).

    Example:
        >>> b = compute_beliefs(model, ChatFormatter(tok), ["How do I bake bread?"], directions)
        >>> b.delta_harmful, b.delta_refuse
    """
    directions.check_model(model, formatter)
    idx = resolve_layers(directions, layers)
    c = directions.centroids
    per_h = torch.empty(len(prompts), len(idx), dtype=torch.float64)
    per_r = torch.empty_like(per_h)
    for rows, by_pos in collect_states(model, formatter, prompts, states=idx, batch_size=batch_size,
                                       wrapper=wrapper, progress=progress):
        per_h[rows] = belief_per_layer(by_pos["t_inst"].cpu(), c["harmful"][idx], c["harmless"][idx])
        per_r[rows] = belief_per_layer(by_pos["t_post_inst"].cpu(), c["refused"][idx], c["accepted"][idx])
    return Beliefs(delta_harmful=per_h.mean(-1), delta_refuse=per_r.mean(-1),
                   per_layer_harmful=per_h, per_layer_refuse=per_r, layers=tuple(idx))
