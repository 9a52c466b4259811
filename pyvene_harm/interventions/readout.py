"""Belief read-out as pyvene interventions: the model's harmfulness / refusal belief per example.

A :class:`Readout` puts one :class:`~.classes.BeliefReadout` at each chosen state (the input of
decoder layer l, or for l = L the last layer's output, matching a DirectionSet's L+1 states)
and returns their scores from one forward pass. The stream is never changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..directions import DirectionSet
from ..positions import PromptBatch
from ..pyvene_support import decoder_layers
from .classes import BELIEF_COLUMNS, BeliefReadout
from .selectors import Selector, select_positions
from .steering import InterventionModel, Site, check_directions_fit

__all__ = ["BeliefReadings", "Readout", "readout"]

_CENTROIDS = {"harmfulness": ("harmful", "harmless"), "refusal": ("refused", "accepted")}
_DEFAULT_POSITIONS = {"harmfulness": "t_inst", "refusal": "t_post_inst"}


@dataclass(frozen=True)
class BeliefReadings:
    """Scores of one read-out pass.

    ``scores`` is ``[n_states, batch, n_slots, 4]`` (columns :data:`BELIEF_COLUMNS`), NaN on
    padded slots; ``positions[i]`` are example i's slots (indices into the padded batch).
    """

    states: tuple[int, ...]
    positions: list[list[int]]
    mask: torch.Tensor
    scores: torch.Tensor

    def column(self, name: str) -> torch.Tensor:
        """``[n_states, batch, n_slots]`` of one column (``"projection"``, ``"delta"``, ...)."""
        if name not in BELIEF_COLUMNS:
            raise ValueError(f"unknown column {name!r}: choose one of {', '.join(BELIEF_COLUMNS)}")
        return self.scores[..., BELIEF_COLUMNS.index(name)]

    def belief(self) -> torch.Tensor:
        """``[batch, n_slots]``: mean over states of cos(positive) - cos(negative), the paper's Delta.

        Positive means "harmful" (harmfulness) or "will refuse" (refusal).
        """
        return self.column("delta").mean(dim=0)


class Readout(InterventionModel):
    """Belief read-outs inside pyvene; build with :func:`readout`.

    Example:
        >>> r = readout(model, ds, direction="harmfulness")
        >>> r.forward(fmt.encode(prompts)).belief()[:, 0] > 0      # the Latent Guard's decision
    """

    kind = "readout"

    def __init__(self, model: nn.Module, sites: Sequence[Site], *, positions: str | Selector = "t_inst",
                 metadata: Mapping[str, Any] | None = None) -> None:
        if not all(isinstance(s.intervention, BeliefReadout) for s in sites):
            raise TypeError("a Readout holds BeliefReadout interventions only; use Steering for the others")
        super().__init__(model, sites, positions=positions, metadata=metadata)
        n = len(decoder_layers(model))
        self.states = tuple(s.layer + (s.component == "block_output") for s in self.sites)
        if len(set(self.states)) != len(self.states) or max(self.states) > n:
            raise ValueError(f"read-out states must be distinct and within 0-{n}: got {self.states}")

    def forward(self, batch: PromptBatch) -> BeliefReadings:
        """One forward pass; the model's output is discarded, the stream left unchanged."""
        self._check_batch(batch)
        sel = select_positions(self.positions, batch)
        with torch.inference_mode():
            (_, collected), _ = self.intervenable(
                batch.model_inputs(), unit_locations=sel.unit_locations(len(self.sites)),
                intervention_additional_kwargs={"slot_mask": sel.mask.to(batch.input_ids.device)},
            )
        scores = torch.stack([c.float().cpu() for c in collected])
        return BeliefReadings(states=self.states, positions=sel.positions, mask=sel.mask > 0, scores=scores)

    __call__ = forward


def _site_for_state(state: int, n_layers: int) -> tuple[int, str]:
    if isinstance(state, bool) or not isinstance(state, int) or not 0 <= state <= n_layers:
        raise ValueError(
            f"layer {state} is out of range: this model has {n_layers} decoder layers (0-{n_layers - 1}), "
            f"and {n_layers} reads the last layer's output"
        )
    return (state, "block_input") if state < n_layers else (n_layers - 1, "block_output")


def readout(model: nn.Module, directions: DirectionSet, *, direction: str = "harmfulness",
            layers: int | Sequence[int] | None = None, positions: str | Selector | None = None) -> Readout:
    """Read the harmfulness or refusal belief at each chosen state.

    Args:
        direction: ``"harmfulness"`` (centroids harmful/harmless) or ``"refusal"`` (refused/accepted).
        layers: state indices; ``None`` is all L+1 states (each layer's input plus the last
            layer's output), as the paper averages over.
        positions: default ``"t_inst"`` for harmfulness, ``"t_post_inst"`` for refusal.
    """
    if direction not in _CENTROIDS:
        raise ValueError(f"unknown direction {direction!r}: choose one of {', '.join(_CENTROIDS)}")
    check_directions_fit(model, directions)
    n = len(decoder_layers(model))
    states = list(range(n + 1)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    if not states:
        raise ValueError("layers is empty: pass None (every state) or some indices")
    pos_name, neg_name = _CENTROIDS[direction]
    sites = []
    for state in states:
        layer, component = _site_for_state(state, n)
        if state >= directions.n_states:
            raise ValueError(f"the directions have no state {state}: they cover 0-{directions.n_states - 1}")
        sites.append(Site(layer=layer, component=component, intervention=BeliefReadout(
            direction=directions.direction(direction, state), positive=directions.centroids[pos_name][state],
            negative=directions.centroids[neg_name][state], name=f"{direction}.{state}")))
    meta = {"direction": direction, "directions_model_id": directions.metadata.get("model_id")}
    return Readout(model, sites, positions=positions or _DEFAULT_POSITIONS[direction], metadata=meta)
