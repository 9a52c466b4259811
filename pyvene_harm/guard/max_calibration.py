"""Calibrating a scan read's maximum on prompts of groups it was not fitted on.

A ``scan:K`` guard's verdict is the highest of its read-out's window scores. The read-out is
fitted on windows (every prompt's last, and a harmless prompt's highest few) and its threshold
sits where *those rows* balance. The maximum over the windows of a prompt from a source it never
saw is another quantity: a long harmless instruction has many windows, so many chances to fire,
and the level of the maxima moves from one fit to the next (``docs/guard-choice.md``, third and
fourth decisions: unseen harmless sources were flagged at 40-55%).

Here the maximum itself is calibrated. The read-out is refitted with each fold of training groups
left out in turn (its strength ``C`` as chosen, its rows as they were), every prompt of the
left-out groups is scored by its highest window under that refit, and a one-feature logistic
regression (Platt scaling) on those out-of-group maxima gives a slope ``a > 0`` and an intercept
``b``. The guard's read-out becomes ``a * score + b``: one increasing map applied to every window,
so the verdict is still the maximum over windows and appending text still cannot lower it.

Where the verdict is cut is a second choice (``threshold``): ``"platt"`` cuts at probability 1/2 of
that balanced fit; ``"worst_source"`` moves the cut along the same calibrated score to where the
worst training source does best on those out-of-group maxima (each source's share of prompts on
the right side of the cut, harmful sources and harmless ones alike), since a guard is judged by
the source it handles worst. Either way only the intercept moves: the map stays increasing.

The refits reuse the final fit's rows, harmless windows and mined negatives included; those were
chosen by a read-out that had seen the left-out groups, a small leak the calibration accepts
rather than re-running the whole fit per fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .readout import LinearReadout

__all__ = ["CALIBRATION_FOLDS", "MAX_THRESHOLDS", "OutOfGroupReadouts", "balanced_weights", "platt",
           "worst_source_threshold"]

CALIBRATION_FOLDS = 10
"""Folds of training groups the read-out is refitted without (fewer when there are fewer groups)."""

MAX_THRESHOLDS = ("platt", "worst_source")
"""Where a calibrated maximum is cut (module docstring)."""


def balanced_weights(positive: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Every group the same total weight within its class, both classes the same total weight:
    the calibration must not be set by whichever source has the most prompts."""
    positive = np.asarray(positive, dtype=bool)
    groups = np.asarray(groups).astype(str)
    w = np.zeros(len(positive))
    for cls in (False, True):
        names = np.unique(groups[positive == cls])
        for name in names:
            m = (groups == name) & (positive == cls)
            w[m] = 1.0 / (m.sum() * len(names))
    return w * len(w) / 2.0


def platt(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """``(a, b)`` of ``P(harmful) = sigmoid(a * score + b)`` fitted on held-out scores; refuses a
    slope that is not positive (the scores would not rank harmful above harmless, and a decreasing
    map would turn the maximum over windows into a minimum)."""
    from sklearn.linear_model import LogisticRegression

    s = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(positive, dtype=bool)
    if not np.isfinite(s).all():
        raise ValueError("held-out maxima hold NaN or inf: the read-out's states are not finite")
    if y.all() or not y.any():
        raise ValueError("calibrating the maximum needs held-out prompts of both classes")
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(s, y, sample_weight=weights)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if not a > 0:
        raise ValueError(f"the out-of-group maxima do not rank harmful prompts above harmless ones (slope {a:.3g}): "
                         "the maximum cannot be calibrated; use more training sources or a last:K read")
    return a, b


def worst_source_threshold(scores: np.ndarray, positive: np.ndarray, groups: Sequence[Any]) -> tuple[float, float]:
    """``(t, accuracy)``: the cut (flag ``score > t``) with the highest lowest accuracy over the
    (group, class) units, ties to the higher mean accuracy over units and then to the cut nearest
    0; ``t`` lies halfway between two neighbouring scores, so no training score sits on it."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    g = np.asarray(groups).astype(str)
    if not np.isfinite(s).all():
        raise ValueError("held-out maxima hold NaN or inf: the read-out's states are not finite")
    u = np.unique(s)
    cuts = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2, u[-1] + 1.0]
    flagged = s[None, :] > cuts[:, None]  # [cuts, n]
    correct = flagged == y[None, :]
    units = sorted({(name, bool(c)) for name, c in zip(g.tolist(), y.tolist())})
    acc = np.stack([correct[:, (g == name) & (y == c)].mean(axis=1) for name, c in units], axis=1)
    worst, mean = acc.min(axis=1), acc.mean(axis=1)
    order = np.lexsort((np.abs(cuts), -mean, -worst))
    return float(cuts[order[0]]), float(worst[order[0]])


@dataclass
class OutOfGroupReadouts:
    """A read-out refitted once per fold of training groups, each without its fold's rows.

    Build with :meth:`fit`; score a prompt of group ``g`` with :meth:`projection` ``(g)`` (the
    refit that did not see ``g``), then :meth:`calibrate` the full read-out on those scores.
    """

    readout: LinearReadout
    fold_of_group: dict[str, int]
    refits: list[LinearReadout]

    @classmethod
    def fit(cls, readout: LinearReadout, x: np.ndarray, positive: np.ndarray, groups: Sequence[Any], *,
            rank: int | None, sample_weight: np.ndarray | None = None,
            n_folds: int = CALIBRATION_FOLDS) -> OutOfGroupReadouts:
        """Refit ``readout`` (strength fixed at its ``C``) on ``x`` without each fold of groups.

        Args:
            readout: the fitted read-out to calibrate.
            x: ``[n, F, d]`` the rows it was fitted on; ``positive`` their labels.
            groups: ``[n]`` group of each row (a source; rows of one prompt share a group).
            rank, sample_weight: as the read-out was fitted.
            n_folds: at most this many refits; groups are dealt to folds in sorted order.
        """
        g = np.asarray(groups).astype(str)
        y = np.asarray(positive, dtype=bool)
        names = sorted(set(g.tolist()))
        k = min(n_folds, len(names))
        if k < 2:
            raise ValueError("calibrating the maximum needs at least two groups of training rows")
        fold_of_group = {name: i % k for i, name in enumerate(names)}
        fold = np.asarray([fold_of_group[v] for v in g])
        refits = []
        for f in range(k):
            keep = fold != f
            if y[keep].all() or not y[keep].any():
                raise ValueError(f"leaving out groups {[n for n, i in fold_of_group.items() if i == f]} leaves one "
                                 "class: calibrating the maximum needs both classes in every refit (more groups)")
            w = None if sample_weight is None else np.asarray(sample_weight)[keep]
            refits.append(LinearReadout.fit(x[keep], y[keep], C=readout.C, rank=rank, sample_weight=w))
        return cls(readout=readout, fold_of_group=fold_of_group, refits=refits)

    def projection(self, group: Any) -> tuple[np.ndarray, float]:
        """``(v, offset)`` of the refit that left ``group`` out (see
        :meth:`LinearReadout.projection`)."""
        name = str(group)
        if name not in self.fold_of_group:
            raise KeyError(f"group {name!r} held no training rows: it has no refit that left it out")
        return self.refits[self.fold_of_group[name]].projection()

    def calibrate(self, max_scores: np.ndarray, positive: np.ndarray, groups: Sequence[Any], *,
                  threshold: str = "platt") -> LinearReadout:
        """The full read-out mapped by the Platt fit of out-of-group maxima (every group and both
        classes weighted equally), cut where ``threshold`` says (:data:`MAX_THRESHOLDS`);
        ``cv["max_calibration"]`` records the fit."""
        if threshold not in MAX_THRESHOLDS:
            raise ValueError(f"threshold must be one of {MAX_THRESHOLDS}, got {threshold!r}")
        g = np.asarray(groups).astype(str)
        y = np.asarray(positive, dtype=bool)
        a, b = platt(max_scores, y, balanced_weights(y, g))
        info = {"slope": a, "intercept": b, "folds": len(self.refits), "n": int(len(y)),
                "groups": len(set(g.tolist())), "threshold": threshold}
        if threshold == "worst_source":
            cut, worst = worst_source_threshold(a * np.asarray(max_scores, dtype=np.float64) + b, y, g)
            b -= cut
            info.update(shift=cut, worst_source_accuracy=worst)
        r = self.readout
        return replace(r, coef=r.coef * a, intercept=a * r.intercept + b, cv={**(r.cv or {}), "max_calibration": info})
