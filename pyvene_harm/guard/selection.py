"""Choosing a guard's layer set and threshold on validation data (beyond the paper).

The paper averages Delta_harmful over all L+1 states and cuts at 0. Both choices can be tuned
on held-out prompts: a window of middle layers is often cleaner than all of them, and a
deployment usually wants a bound on false positives (harmless prompts refused) rather than the
best accuracy. Everything here works on a precomputed ``[n, S]`` matrix of per-layer cosine
gaps, so trying hundreds of layer sets costs one forward pass in total.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Selection", "ThresholdChoice", "TARGETS", "choose_threshold", "layer_prefixes",
           "layer_windows", "select_layers"]

TARGETS = ("accuracy", "fpr")
"""``accuracy``: the best validation accuracy. ``fpr``: the best true-positive rate among
thresholds whose false-positive rate is at most ``max_fpr``."""


def layer_windows(states: Sequence[int], *, min_size: int = 1) -> list[tuple[int, ...]]:
    """Every contiguous run of ``states`` with at least ``min_size`` members.

    With the 25 states of a 24-layer model that is 325 candidates; prefixes, single layers
    and the paper's "all layers" are among them.

    Example:
        >>> layer_windows([0, 1, 2], min_size=2)
        [(0, 1), (0, 1, 2), (1, 2)]
    """
    s = list(states)
    return [tuple(s[a:b]) for a in range(len(s)) for b in range(a + min_size, len(s) + 1)]


def layer_prefixes(states: Sequence[int]) -> list[tuple[int, ...]]:
    """``states[:1]``, ``states[:2]``, ...: the candidates that trade accuracy for early exit.

    Example:
        >>> layer_prefixes([0, 1, 2])
        [(0,), (0, 1), (0, 1, 2)]
    """
    s = list(states)
    return [tuple(s[:k]) for k in range(1, len(s) + 1)]


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold (harmful iff score > threshold) and what it achieves on the data it saw."""

    threshold: float
    accuracy: float
    tpr: float
    fpr: float

    @property
    def balanced_accuracy(self) -> float:
        return (self.tpr + 1.0 - self.fpr) / 2


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_layers`, as stored in a guard's ``selection_``."""

    target: str
    max_fpr: float | None
    layers: tuple[int, ...]
    threshold: float
    accuracy: float
    tpr: float
    fpr: float
    n_val: int
    n_candidates: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def choose_threshold(scores: np.ndarray, positive: np.ndarray, *, target: str = "accuracy",
                     max_fpr: float = 0.05, prior: float = 0.0) -> ThresholdChoice:
    """The best cut of ``scores`` for ``target``; ties go to the threshold nearest ``prior``.

    Only cuts between distinct scores are considered (a cut inside a tie cannot separate
    anything), at their midpoints, plus "everything harmful" and "nothing harmful".

    Args:
        scores: ``[n]`` Delta_harmful values.
        positive: ``[n]`` booleans, True for harmful.
        target: ``"accuracy"`` or ``"fpr"`` (see :data:`TARGETS`).
        max_fpr: the false-positive bound for ``target="fpr"``.
        prior: the threshold to prefer among equals (the paper's 0).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"validation data need harmful and harmless prompts; got {n_pos} harmful "
                         f"and {n_neg} harmless")
    order = np.argsort(scores, kind="stable")
    s, p = scores[order], positive[order]
    n = len(s)
    # k = how many of the lowest scores are called harmless; valid at the edges of ties
    ks = np.concatenate([[0], np.flatnonzero(s[1:] > s[:-1]) + 1, [n]])
    cum_pos = np.concatenate([[0], np.cumsum(p)])
    cum_neg = np.concatenate([[0], np.cumsum(~p)])
    tp = n_pos - cum_pos[ks]
    fp = n_neg - cum_neg[ks]
    tn = cum_neg[ks]
    thresholds = np.empty(len(ks))
    for j, k in enumerate(ks):
        if k == 0:
            thresholds[j] = np.nextafter(s[0], -np.inf)
        elif k == n:
            thresholds[j] = s[-1]
        else:
            thresholds[j] = (s[k - 1] + s[k]) / 2
    tpr, fpr = tp / n_pos, fp / n_neg
    acc = (tp + tn) / n
    if target == "accuracy":
        keys = [np.round(acc, 12), np.round((tpr + 1 - fpr) / 2, 12)]
        feasible = np.ones(len(ks), dtype=bool)
    elif target == "fpr":
        keys = [np.round(tpr, 12), np.round(acc, 12)]
        feasible = fpr <= max_fpr + 1e-12
    else:
        raise ValueError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    # lexsort: last key is primary; closeness to the prior breaks the remaining ties
    cand = np.flatnonzero(feasible)
    rank = np.lexsort((-np.abs(thresholds[cand] - prior), keys[1][cand], keys[0][cand]))
    best = cand[rank[-1]]
    return ThresholdChoice(threshold=float(thresholds[best]), accuracy=float(acc[best]),
                           tpr=float(tpr[best]), fpr=float(fpr[best]))


def select_layers(per_layer: np.ndarray, states: Sequence[int], positive: np.ndarray,
                  candidates: Iterable[Sequence[int]], *, target: str = "accuracy",
                  max_fpr: float = 0.05, prior: float = 0.0) -> Selection:
    """The layer set and threshold that do best on validation data.

    Args:
        per_layer: ``[n, len(states)]`` cosine gaps, column j for state ``states[j]``.
        states: the state index of each column.
        positive: ``[n]`` True for harmful.
        candidates: layer sets to try (each a subset of ``states``).

    Ties (after the target's primary and secondary metric) go to the set whose deepest layer
    is shallowest, since it exits earliest, then to the larger set, which averages more noise
    away.
    """
    col = {s: j for j, s in enumerate(states)}
    best_key, best = None, None
    n_cand = 0
    for cand in candidates:
        layers = tuple(sorted({int(x) for x in cand}))
        missing = [x for x in layers if x not in col]
        if not layers or missing:
            raise ValueError(f"candidate layer set {list(cand)} is not a non-empty subset of the fitted "
                             f"states {list(states)}: refit with layers=None or drop it")
        n_cand += 1
        scores = per_layer[:, [col[x] for x in layers]].mean(axis=1)
        ch = choose_threshold(scores, positive, target=target, max_fpr=max_fpr, prior=prior)
        primary, secondary = ((ch.accuracy, ch.balanced_accuracy) if target == "accuracy"
                              else (ch.tpr, ch.accuracy))
        key = (round(primary, 12), round(secondary, 12), -max(layers), len(layers))
        if best_key is None or key > best_key:
            best_key, best = key, (layers, ch)
    if best is None:
        raise ValueError("no candidate layer sets given: pass at least one, or None for all windows")
    layers, ch = best
    return Selection(target=target, max_fpr=max_fpr if target == "fpr" else None, layers=layers,
                     threshold=ch.threshold, accuracy=ch.accuracy, tpr=ch.tpr, fpr=ch.fpr,
                     n_val=int(len(positive)), n_candidates=n_cand)
