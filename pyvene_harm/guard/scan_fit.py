"""The two extra passes a ``scan:K`` guard's fit makes over its training prompts.

A scan guard's verdict is the highest of its read-out's scores over every K-token window of the
instruction (:mod:`~pyvene_harm.windows`). Fitting it on each prompt's last window alone leaves
two gaps, each closed by one more pass over the prompts' token states:

* :func:`harmless_windows`: the windows of harmless prompts that score highest under a first
  fit, added as harmless rows, so that a harmless request's opening words ("How do I kill" of
  "How do I kill a Python process?") do not fire;
* :func:`held_out_maxima`: every prompt's highest window under a refit that did not see its
  group, what :mod:`~pyvene_harm.guard.max_calibration` calibrates the maximum on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..collect import collect_token_states
from ..positions import ChatFormatter
from ..windows import max_window_scores, top_windows, window_means
from .max_calibration import OutOfGroupReadouts
from .readout import LinearReadout

__all__ = ["harmless_windows", "held_out_maxima"]


def harmless_windows(model: Any, fmt: ChatFormatter, prompts: Sequence[Any], positive: np.ndarray,
                     states: Sequence[int], reads: Sequence[str], readout: LinearReadout, width: int, k: int, *,
                     batch_size: int = 16, progress: bool | None = False) -> tuple[np.ndarray, np.ndarray]:
    """States ``[m, S, d]`` of the ``k`` highest-scoring windows of every harmless prompt under
    ``readout`` (its last window aside: that is its ordinary row), and the prompt each came from."""
    harmless = np.flatnonzero(~np.asarray(positive))
    rows, of = [], []
    if not len(harmless):
        return np.zeros((0, len(states), readout.coef.shape[-1])), np.zeros(0, int)
    for idx, _, tokens in collect_token_states(model, fmt, [prompts[i] for i in harmless], states=states,
                                               positions=reads, batch_size=batch_size,
                                               progress=progress and "harmless windows"):
        for j, t in zip(idx, tokens):
            means = window_means(t, width)  # [T, S, d]
            for w in top_windows(readout.score(means), k):
                rows.append(means[w])
                of.append(harmless[j])
    if not rows:
        return np.zeros((0, len(states), readout.coef.shape[-1])), np.zeros(0, int)
    return np.stack(rows), np.asarray(of, dtype=int)


def held_out_maxima(model: Any, fmt: ChatFormatter, prompts: Sequence[Any], groups: np.ndarray,
                    states: Sequence[int], reads: Sequence[str], folds: OutOfGroupReadouts, width: int, *,
                    batch_size: int = 16, progress: bool | None = False) -> np.ndarray:
    """``[n]`` each prompt's highest window score under the refit that left its group out."""
    best = np.empty(len(prompts))
    for idx, _, tokens in collect_token_states(model, fmt, prompts, states=states, positions=reads,
                                               batch_size=batch_size, progress=progress and "calibrating the maximum"):
        for j, t in zip(idx, tokens):
            v, offset = folds.projection(groups[j])
            proj = np.einsum("tsd,sd->t", t.double().numpy(), v)
            best[j] = max_window_scores([proj], width, offset)[0][0]
    return best
