"""What one scoring pass of a :class:`~pyvene_harm.guard.LatentGuard` yields per prompt, and the
fail-closed rule that turns scores into verdicts (kept apart from the estimator so that the
server and the conversation judge can share them without importing the estimator)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GuardReport", "flag_decisions"]

logger = logging.getLogger("pyvene_harm.guard")


def flag_decisions(d: np.ndarray) -> np.ndarray:
    """``[n]`` harmful where ``d > 0`` *or* ``d`` is not a number: fail closed.

    ``NaN > 0`` is False, so a plain comparison calls every prompt whose score overflowed (a
    float16 model) or was poisoned (a NaN in the guard) harmless. Such a prompt is flagged, and
    the fault is logged.
    """
    bad = ~np.isfinite(d)
    if bad.any():
        logger.error("the guard's score is not a finite number for %d of %d prompts (overflow in the model's "
                     "dtype, or a corrupt guard): they are flagged as harmful", int(bad.sum()), len(d))
    return (d > 0) | bad


@dataclass(frozen=True)
class GuardReport:
    """Everything one scoring pass yields, per prompt (see :meth:`LatentGuard.report`)."""

    delta_harmful: np.ndarray
    """``[n]`` Delta_harmful: the mean cosine gap to the harmful vs harmless centroids over the
    guard's reads and ``layers`` (the paper's belief score)."""
    per_layer: np.ndarray
    """``[n, len(reads) * len(layers)]`` cosine gaps, read-major."""
    layers: tuple[int, ...]
    harmful: np.ndarray
    """``[n]`` bool: the decision score exceeds the threshold."""
    probability: np.ndarray
    """``[n]`` P(harmful) (calibrated when the guard is)."""
    category: list[str] | None
    """Nearest harm category per prompt, when the guard has per-category centroids."""
    score: np.ndarray | None = None
    """``[n]`` the score the threshold cuts: Delta_harmful for ``method="paper"``, the read-out's
    log-odds for ``method="linear"``. None means the same as ``delta_harmful``."""
    category_scores: np.ndarray | None = None
    """``[n, C]`` mean cosine gap to each category centroid vs the harmless one, when the guard
    has categories (order of ``guard.categories_``)."""
    delta_refuse: np.ndarray | None = None
    """``[n]`` Delta_refuse at t_post_inst (positive: the model leans to refusing), when the guard
    has a refusal read (:meth:`LatentGuard.set_refusal_read`); from the same prefill."""
    refuse_probability: np.ndarray | None = None
    """``[n]`` P(the model refuses), when the refusal read is calibrated on the model's refusals."""

    def __post_init__(self) -> None:
        if self.score is None:
            object.__setattr__(self, "score", self.delta_harmful)

    def rows(self, prompts: Sequence[str] | None = None) -> list[dict[str, Any]]:
        out = []
        for i in range(len(self.delta_harmful)):
            row = {"prompt": prompts[i]} if prompts is not None else {}
            row.update(delta_harmful=float(self.delta_harmful[i]), score=float(self.score[i]),
                       harmful=bool(self.harmful[i]), probability=float(self.probability[i]))
            if self.category is not None:
                row["category"] = self.category[i]
            if self.delta_refuse is not None:
                row["delta_refuse"] = float(self.delta_refuse[i])
            if self.refuse_probability is not None:
                row["refuse_probability"] = float(self.refuse_probability[i])
            out.append(row)
        return out
