"""Reading a prompt along its instruction: every K-token window, the verdict their maximum.

A read at the end of the instruction (t_inst, or the mean of its last K tokens) can be diluted:
write anything after a harmful request ("... Also, unrelated: write a haiku about spring") and
the tokens read are the harmless tail's. Attention is causal, so the states of the request's
own tokens do not change when text is appended after them. A read-out applied to the window
of K tokens ending at *every* token of the instruction (``scan:K``), with the verdict taken over
all of them, therefore sees every window the request alone would show, whatever follows it:
appending text can only add windows, never lower the maximum.

The windows are clipped at the instruction's first token, so the first K - 1 are shorter
(the window ending at the first token is that token alone): a request shorter than K has its
whole self as a window inside any longer prompt that starts with it.

Scoring needs no window's states: a linear read-out's score of a mean is the mean of the
per-token scores, so each token's state is projected once (:func:`window_scores`), and the
window scores are differences of a running sum. Fitting does need window states
(:func:`window_means`), for the harmless windows that score highest (see
:meth:`~pyvene_harm.guard.LatentGuard.fit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["max_window_scores", "top_windows", "window_means", "window_scores", "window_starts"]


def window_starts(n_tokens: int, width: int) -> np.ndarray:
    """``[n_tokens]`` first token of the window ending at each token (clipped at 0)."""
    if width < 1:
        raise ValueError(f"a window holds at least one token, got width {width}")
    return np.maximum(0, np.arange(n_tokens) - width + 1)


def window_means(tokens: torch.Tensor | np.ndarray, width: int) -> np.ndarray:
    """``[T, ...]`` the mean of the window of ``width`` tokens ending at each of ``T`` tokens
    (float64), from ``[T, ...]`` per-token values: states ``[T, S, d]`` or scores ``[T]``."""
    x = tokens.double().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("an instruction with no tokens has no windows")
    csum = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])
    ends = np.arange(1, len(x) + 1)
    starts = window_starts(len(x), width)
    count = (ends - starts).reshape(-1, *([1] * (x.ndim - 1)))
    return (csum[ends] - csum[starts]) / count


def window_scores(projections: torch.Tensor | np.ndarray, width: int, offset: float) -> np.ndarray:
    """``[T]`` a linear read-out's score of every window, from ``[T]`` per-token projections
    (each token's states dotted with the read-out's weights, summed over states) and the
    read-out's constant ``offset`` (see :meth:`~pyvene_harm.guard.readout.LinearReadout.projection`)."""
    return window_means(projections, width) + offset


def max_window_scores(projections: Sequence[torch.Tensor | np.ndarray], width: int,
                      offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the highest window score and the index of the token its window ends at
    (counted from the instruction's first token)."""
    best = np.empty(len(projections))
    at = np.empty(len(projections), dtype=int)
    for i, p in enumerate(projections):
        s = window_scores(p, width, offset)
        # a NaN anywhere must win (the guard fails closed on a non-finite score)
        j = int(np.argmax(np.where(np.isnan(s), np.inf, s)))
        best[i], at[i] = s[j], j
    return best, at


def top_windows(scores: np.ndarray, k: int, *, skip_last: bool = True) -> np.ndarray:
    """Indices of the ``k`` highest-scoring windows (the last one left out when ``skip_last``:
    it is the prompt's ordinary read, already a training row)."""
    n = len(scores) - (1 if skip_last else 0)
    if n <= 0 or k <= 0:
        return np.zeros(0, dtype=int)
    order = np.argsort(-np.asarray(scores[:n]), kind="stable")
    return np.sort(order[:k])
