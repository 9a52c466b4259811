"""Harmfulness and refusal directions as ordinary pyvene interventions.

Classes (usable in any ``IntervenableModel``), position selectors, one-call builders with three
generation modes, and artifacts (safetensors + JSON, stable registry names).
"""

from __future__ import annotations

from .artifacts import FORMAT_VERSION
from .classes import BELIEF_COLUMNS, BeliefReadout, DirectionAddition, DirectionalAblation
from .loading import load_intervention
from .readout import BeliefReadings, Readout, readout
from .registry import intervention_class, register_intervention, registered_interventions
from .selectors import (
    PositionSelector,
    SelectedPositions,
    Selector,
    all_prompt,
    context,
    generated,
    parse_positions,
    post_inst,
    prompt_mask,
    select_positions,
    selector_names,
    t_inst,
    t_post_inst,
    union,
)
from .steering import Site, Steering, ablate, check_layer, steer

__all__ = [
    "BELIEF_COLUMNS",
    "BeliefReadings",
    "BeliefReadout",
    "DirectionAddition",
    "DirectionalAblation",
    "FORMAT_VERSION",
    "PositionSelector",
    "Readout",
    "SelectedPositions",
    "Selector",
    "Site",
    "Steering",
    "ablate",
    "all_prompt",
    "check_layer",
    "context",
    "generated",
    "intervention_class",
    "load_intervention",
    "parse_positions",
    "post_inst",
    "prompt_mask",
    "readout",
    "register_intervention",
    "registered_interventions",
    "select_positions",
    "selector_names",
    "steer",
    "t_inst",
    "t_post_inst",
    "union",
]
