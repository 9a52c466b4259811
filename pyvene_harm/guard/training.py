"""Validating a guard's training data and reducing it to class centroids.

Kept apart from the estimator so that the checks scikit-learn's conventions ask for (label
types, binary targets, 2-D/3-D arrays, finite values) read in one place, with the messages
that ``check_estimator`` expects and that name the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import column_or_1d

from ..directions import model_provenance
from ..positions import ChatFormatter
from .features import to_array

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(estimator, X, y="no_validation", **kwargs):
        return estimator._validate_data(X, y, **kwargs)

__all__ = ["binary_labels", "class_sums", "fit_provenance", "precomputed_states", "states_array"]

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
               categories: Sequence[str | None] | None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Float64 sums and counts of states ``[b, S, d]`` per class (and per harm category).

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
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(key: str, x: torch.Tensor) -> None:
        if len(x):
            sums[key] = sums[key] + x.sum(0) if key in sums else x.sum(0)
            counts[key] = counts.get(key, 0) + len(x)

    for idx, x in batches:
        pos = torch.from_numpy(np.asarray(positive)[idx])
        add("harmful", x[pos])
        add("harmless", x[~pos])
        if categories is not None:
            for c in sorted({categories[i] for i in idx if positive[i]}):
                add(f"category:{c}", x[[j for j, i in enumerate(idx) if positive[i] and categories[i] == c]])
    return sums, counts


def precomputed_states(layers: Sequence[int] | None, s: int) -> tuple[int, ...]:
    """The state index of each of the ``s`` columns of a precomputed array."""
    if layers is None:
        return tuple(range(s))
    states = tuple(sorted({int(x) for x in layers}))
    if len(states) != s:
        raise ValueError(f"layers={list(layers)} names {len(states)} states but X holds {s}: "
                         "in precomputed mode give the state index of each column of X")
    return states


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
    count) and reshaped back; a 2-D array holds ``guard.n_states`` states when fitting (1 by
    default) and the fitted number afterwards.
    """
    X = to_array(X)
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape) == 3:
        s, d = int(shape[1]), int(shape[2])
        if not reset and (s, d) != (len(guard.states_), guard.hidden_size_):
            raise ValueError(f"X holds {s} states of width {d}, but this guard was fitted on "
                             f"{len(guard.states_)} states of width {guard.hidden_size_}")
        X = np.asarray(X).reshape(shape[0], s * d)
    else:
        s = (guard.n_states or 1) if reset else len(guard.states_)
    kwargs = dict(dtype=(np.float64, np.float32), reset=reset)
    if reset:
        X, y = _validate_data(guard, X, y, **kwargs)
    else:
        X = _validate_data(guard, X, **kwargs)
    if X.shape[1] % s:
        raise ValueError(f"X has {X.shape[1]} features, which do not split into n_states={s} states")
    arr = X.reshape(X.shape[0], s, X.shape[1] // s)
    return (arr, y) if reset else arr
