"""Validating a guard's training data and reducing it to class centroids.

Kept apart from the estimator so that the checks scikit-learn's conventions ask for (label
types, binary targets, 2-D/3-D arrays, finite values) read in one place, with the messages
that ``check_estimator`` expects and that name the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import column_or_1d

from ..directions import model_provenance
from ..positions import ChatFormatter
from .features import iter_prompt_states, to_array

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(estimator, X, y="no_validation", **kwargs):
        return estimator._validate_data(X, y, **kwargs)

__all__ = ["PromptRows", "binary_labels", "class_sums", "collect_prompt_states", "expand_surface_variants",
           "fit_provenance",
           "precomputed_states", "prompt_rows",
           "states_array"]

# label names that sort after their opposite ("harmful" < "harmless"), which would make
# scikit-learn's positive class (classes_[1]) the harmless one
_NEGATIVE_NAMES = {"harmless", "safe", "benign", "accepted"}


def binary_labels(y: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, harmful mask)`` of training labels, validated."""
    y = column_or_1d(np.asarray(y), warn=True)
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} prompts: give one label per prompt (1 = harmful, 0 = harmless)")
    check_classification_targets(y)
    classes = np.unique(y)
    if len(classes) > 2:
        raise ValueError(f"Only binary classification is supported. The type of the target is "
                         f"{type_of_target(y, input_name='y')} ({len(classes)} labels): use labels "
                         "1 = harmful, 0 = harmless")
    if len(classes) != 2:
        raise ValueError(f"LatentGuard needs harmful and harmless examples; got 1 class "
                         f"({classes.tolist()}): add prompts of the other class")
    if str(classes[1]).lower() in _NEGATIVE_NAMES:
        raise ValueError(f"labels {classes.tolist()} would make {classes[1]!r} the harmful class "
                         "(scikit-learn's positive class is the larger label): use 1 = harmful, 0 = harmless")
    return classes, y == classes[1]


def class_sums(batches: Iterable[tuple[list[int], torch.Tensor]], positive: np.ndarray,
               categories: Sequence[str | None] | None, weights: np.ndarray | None = None,
               ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, int]]:
    """Float64 (weighted) sums, total weights and counts of states ``[b, S, d]`` per class (and
    per harm category); a centroid is ``sums[k] / totals[k]``.

    Streaming: only one batch of states is alive at a time, so fitting on thousands of
    prompts needs no more memory than scoring one batch.
    """
    n = len(positive)
    if categories is not None:
        categories = list(categories)
        if len(categories) != n:
            raise ValueError(f"{len(categories)} categories for {n} prompts: give one per prompt "
                             "(None for harmless ones)")
        bad = next((i for i in range(n) if positive[i] and not isinstance(categories[i], str)), None)
        if bad is not None:
            raise ValueError(f"harmful prompt {bad} has category {categories[bad]!r}: every harmful "
                             "prompt needs a category name")
    w_all = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(key: str, x: torch.Tensor, w: torch.Tensor) -> None:
        if len(x):
            s = torch.einsum("b,b...->...", w, x)
            sums[key] = sums[key] + s if key in sums else s
            totals[key] = totals.get(key, 0.0) + float(w.sum())
            counts[key] = counts.get(key, 0) + len(x)

    for idx, x in batches:
        pos = torch.from_numpy(np.asarray(positive)[idx])
        w = w_all[idx]
        add("harmful", x[pos], w[pos])
        add("harmless", x[~pos], w[~pos])
        if categories is not None:
            for c in sorted({categories[i] for i in idx if positive[i]}):
                rows = [j for j, i in enumerate(idx) if positive[i] and categories[i] == c]
                add(f"category:{c}", x[rows], w[rows])
    for key, t in totals.items():
        if t <= 0:
            what = key.replace("category:", "category ")
            raise ValueError(f"every {what} prompt has sample weight 0, which leaves one class to fit on: "
                             "give prompts of both classes a positive weight")
    return sums, totals, counts


def precomputed_states(layers: Sequence[int] | None, s: int, n_reads: int = 1) -> tuple[int, ...]:
    """The state index of each of the ``s`` columns (per read) of a precomputed array."""
    if layers is None:
        return tuple(range(s))
    states = tuple(sorted({int(x) for x in layers}))
    if len(states) != s:
        per = f" per read ({n_reads} reads)" if n_reads > 1 else ""
        raise ValueError(f"layers={list(layers)} names {len(states)} states but X holds {s}{per}: "
                         "in precomputed mode give the state index of each column of X")
    return states


def expand_surface_variants(prompts: Sequence[str], positive: np.ndarray, groups: Sequence[Any],
                            categories: Sequence[str | None] | None,
                            sample_weight: Sequence[float] | None) -> tuple[list[str], np.ndarray, list[Any],
                                                                             list[str | None] | None,
                                                                             list[float] | None, np.ndarray]:
    """Every prompt followed by its distinct surface variants, each with the prompt's label,
    group, category and weight (so a prompt and its variants stay in one cross-validation fold),
    and last the index of the prompt each row came from (a prompt's own row first)."""
    from ..surface import surface_variants

    out_p, out_y, out_g, out_c, out_w, came_from = [], [], [], [], [], []
    for i, p in enumerate(prompts):
        for v in dict.fromkeys([p, *surface_variants(p).values()]):
            out_p.append(v)
            out_y.append(bool(positive[i]))
            out_g.append(groups[i])
            out_c.append(None if categories is None else categories[i])
            out_w.append(None if sample_weight is None else float(sample_weight[i]))
            came_from.append(i)
    return (out_p, np.asarray(out_y), out_g, None if categories is None else out_c,
            None if sample_weight is None else out_w, np.asarray(came_from, dtype=int))


def collect_prompt_states(model: Any, fmt: ChatFormatter, prompts: Sequence[Any], states: Sequence[int],
                          reads: Sequence[str], *, batch_size: int, progress: bool | str | None,
                          states_cache: Any = None) -> torch.Tensor:
    """``[n, len(reads) * len(states), d]`` float64 states of every prompt, in prompt order (from
    ``states_cache`` where it holds them)."""
    if states_cache is not None:
        return states_cache.collect(model, fmt, prompts, states, reads, batch_size=batch_size, progress=progress)
    out = None
    for idx, x in iter_prompt_states(model, fmt, prompts, states, batch_size=batch_size, progress=progress,
                                     reads=reads):
        if out is None:
            out = torch.empty((len(prompts), *x.shape[1:]), dtype=torch.float64)
        out[idx] = x
    return out


@dataclass
class PromptRows:
    """The rows a fit on prompts reads: the prompts (and their surface variants when it augments),
    with what goes with each."""

    prompts: list[Any]
    classes: np.ndarray
    positive: np.ndarray
    groups: list[Any]
    """Cross-validation groups: the caller's, else one per prompt (its variants in its group)."""
    categories: list[str | None] | None
    sample_weight: list[float] | None
    original: np.ndarray
    """True on a prompt as given, False on a surface variant of it."""
    budget_groups: list[Any]
    """Groups a sentence margin's budget is counted in: the caller's margin groups, else its
    groups, else a single group; None on a prompt the margin is not fitted on."""


def prompt_rows(prompts: Sequence[Any], y: Any, groups: Sequence[Any] | None,
                categories: Sequence[str | None] | None, sample_weight: Sequence[float] | None, *,
                augment: bool, budget_groups: Sequence[Any] | None = None) -> PromptRows:
    """Labels checked, groups filled in and, with ``augment``, every instruction followed by its
    surface variants (:func:`expand_surface_variants`)."""
    classes, positive = binary_labels(y, len(prompts))
    if budget_groups is None:
        budget_groups = [0] * len(prompts) if groups is None else list(groups)
    budget_groups = list(budget_groups)
    groups = list(range(len(prompts))) if groups is None else list(groups)
    original = np.ones(len(prompts), bool)
    prompts = list(prompts)
    if augment:
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("augment=True edits the surface of instructions: fit on instruction strings, "
                             "or with augment=False")
        prompts, positive, groups, categories, sample_weight, came_from = expand_surface_variants(
            prompts, positive, groups, categories, sample_weight)
        budget_groups = [budget_groups[i] for i in came_from]
        original = np.r_[True, came_from[1:] != came_from[:-1]]
    return PromptRows(prompts=prompts, classes=classes, positive=positive, groups=groups, categories=categories,
                      sample_weight=sample_weight, original=original, budget_groups=budget_groups)


def fit_provenance(model: Any, fmt: ChatFormatter, prompts: Sequence[str], positive: np.ndarray) -> dict[str, Any]:
    """The model's provenance plus fingerprints of the training prompts."""
    from ..data import fingerprint

    meta = model_provenance(model, fmt)
    groups = {"harmful": [p for p, f in zip(prompts, positive) if f],
              "harmless": [p for p, f in zip(prompts, positive) if not f]}
    meta["data"] = {k: {"n": len(v), "fingerprint": fingerprint(v)} for k, v in groups.items()}
    meta["system_prompt"] = fmt.system_prompt
    return meta


def states_array(guard: Any, X: Any, *, y: Any = None, reset: bool) -> Any:
    """Validate precomputed states; returns ``[n, S, d]`` (and ``y`` when ``reset``, i.e. fitting).

    A 3-D array is flattened for scikit-learn's validation (finite values, dtype, feature
    count) and reshaped back; a 2-D array holds ``guard.n_states`` columns when fitting (1 by
    default) and the fitted number (reads x states) afterwards.
    """
    X = to_array(X)
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape) == 3:
        s, d = int(shape[1]), int(shape[2])
        fitted = len(guard.states_) * len(guard.reads_) if not reset else s
        if not reset and (s, d) != (fitted, guard.hidden_size_):
            raise ValueError(f"X holds {s} states of width {d}, but this guard was fitted on "
                             f"{fitted} states of width {guard.hidden_size_}")
        X = np.asarray(X).reshape(shape[0], s * d)
    else:
        s = (guard.n_states or 1) if reset else len(guard.states_) * len(guard.reads_)
    kwargs = dict(dtype=(np.float64, np.float32), reset=reset)
    if reset:
        X, y = _validate_data(guard, X, y, **kwargs)
    else:
        X = _validate_data(guard, X, **kwargs)
    if X.shape[1] % s:
        raise ValueError(f"X has {X.shape[1]} features, which do not split into n_states={s} states")
    arr = X.reshape(X.shape[0], s, X.shape[1] // s)
    return (arr, y) if reset else arr
