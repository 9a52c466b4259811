"""The extra passes a ``scan:K`` or ``sent:K`` guard's fit makes over its training prompts.

A scan guard's verdict is the highest of its read-out's scores over every K-token window of the
instruction (:mod:`~pyvene_harm.windows`). Fitting it on each prompt's last window alone leaves
two gaps, each closed by one more pass over the prompts' token states (:func:`fit_readout` makes
the fit and both passes):

* :func:`harmless_windows`: the windows of harmless prompts that score highest under a first
  fit, added as harmless rows, so that a harmless request's opening words ("How do I kill" of
  "How do I kill a Python process?") do not fire;
* :func:`held_out_maxima`: every prompt's highest window under a refit that did not see its
  group, what :mod:`~pyvene_harm.guard.max_calibration` calibrates the maximum on.

A ``sent:K`` guard's read-out is fitted as a ``last:K`` one; :func:`fit_sentence_margin` makes its
one extra pass, over the harmless prompts, for the margin its earlier sentence ends must clear
(:mod:`~pyvene_harm.sentences`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..collect import collect_token_states
from ..positions import ChatFormatter
from ..reads import fixed_reads, scan_width, sentence_width
from ..sentences import fit_margin, instruction_pieces, last_and_earlier, sentence_ends
from ..windows import max_window_scores, top_windows, window_means, window_scores
from .max_calibration import OutOfGroupReadouts
from .readout import DEFAULT_CS, LinearReadout

__all__ = ["fit_readout", "fit_sentence_margin", "harmless_windows", "held_out_maxima"]


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


def fit_readout(guard: Any, model: Any, fmt: ChatFormatter | None, prompts: Sequence[Any] | None, x: np.ndarray,
                positive: np.ndarray, weights: np.ndarray | None, groups: Sequence[Any] | None,
                states: Sequence[int], reads: Sequence[str]) -> LinearReadout:
    """A ``method="linear"`` guard's read-out on the training states ``x`` (``[n, S, d]``); for a
    ``scan:K`` read fitted on prompts, refitted with their highest harmless windows
    (``scan_negatives``) and, with ``calibrate_max``, calibrated on out-of-group maxima."""
    fit_x, fit_y, fit_w = x, positive, weights
    fit_g = None if groups is None else np.asarray(groups, dtype=object).astype(str)
    cs = tuple(guard.Cs or DEFAULT_CS)
    readout = LinearReadout.fit(fit_x, fit_y, C=guard.C, Cs=cs, sample_weight=weights, rank=guard.rank, groups=fit_g)
    width = scan_width(reads[0])
    if width is not None and prompts is not None and guard.scan_negatives:
        rows, of = harmless_windows(model, fmt, prompts, positive, states, fixed_reads(reads), readout, width,
                                    guard.scan_negatives, batch_size=guard.batch_size, progress=guard.progress)
        if len(rows):
            fit_x = np.concatenate([fit_x, rows])
            fit_y = np.concatenate([fit_y, np.zeros(len(rows), bool)])
            fit_g = None if fit_g is None else np.concatenate([fit_g, fit_g[of]])
            fit_w = None if weights is None else np.concatenate([weights, weights[of]])
            readout = LinearReadout.fit(fit_x, fit_y, C=guard.C, Cs=cs, sample_weight=fit_w, rank=guard.rank,
                                        groups=fit_g)
            readout.cv = {**(readout.cv or {}), "window_negatives": int(len(rows))}
    if guard.calibrate_max:
        folds = OutOfGroupReadouts.fit(readout, fit_x, fit_y, fit_g, rank=guard.rank, sample_weight=fit_w)
        best = held_out_maxima(model, fmt, prompts, fit_g[:len(prompts)], states, fixed_reads(reads), folds,
                               width, batch_size=guard.batch_size, progress=guard.progress)
        readout = folds.calibrate(best, positive, fit_g[:len(prompts)], threshold=guard.max_threshold)
    return readout


def fit_sentence_margin(guard: Any, model: Any, fmt: ChatFormatter, prompts: Sequence[Any], x: np.ndarray,
                        positive: np.ndarray, weights: np.ndarray | None, groups: Sequence[Any],
                        states: Sequence[int], readout: LinearReadout, original: np.ndarray,
                        budget_groups: Sequence[Any], margin_only: Mapping[str, Sequence[Any]] | None = None) -> float:
    """The margin a ``sent:K`` guard's earlier sentence ends must clear
    (:func:`~pyvene_harm.sentences.fit_margin`): the read-out refitted without each fold of
    ``groups`` (:class:`OutOfGroupReadouts`, on the rows ``x`` it was fitted on), and every harmless
    prompt as written (``original``; not its surface variants) scored by the refit that left its
    group out, within ``guard.sentence_budget`` per ``budget_groups`` group (None: not counted).
    ``margin_only`` prompts (harmless, by source name) are never fitted on: the read-out itself
    scores them, each source within the budget as well."""
    width = sentence_width(guard.reads[0])
    if width is None:
        raise ValueError(f"sentence_budget sets the margin of a sent:K read's earlier sentence ends: use reads=['sent:K'] "
                         f"(not {list(guard.reads)})")
    if prompts is None:
        raise ValueError("sentence_budget scores the sentence ends of harmless prompts: fit on prompts, not "
                         "precomputed states")
    g = np.asarray(groups, dtype=object).astype(str)
    folds = OutOfGroupReadouts.fit(readout, x, np.asarray(positive, bool), g, rank=guard.rank, sample_weight=weights)
    counted = np.asarray([b is not None for b in budget_groups], bool)
    which = np.flatnonzero(~np.asarray(positive, bool) & np.asarray(original, bool) & counted)
    if not len(which):
        raise ValueError("sentence_budget needs harmless training prompts to fit the margin on")
    texts = [prompts[i] for i in which]
    # (projection, budget group) per prompt: a training prompt's refit without its group, a
    # margin-only prompt's read-out itself
    scorers = [(folds.projection(g[i]), budget_groups[i]) for i in which]
    for name, extra in (margin_only or {}).items():
        texts += list(extra)
        scorers += [(readout.projection(), f"margin-only:{name}")] * len(extra)
    last, earlier = np.empty(len(texts)), np.empty(len(texts))
    for idx, _, tokens in collect_token_states(model, fmt, texts, states=states, positions=fixed_reads(guard.reads),
                                               batch_size=guard.batch_size,
                                               progress=guard.progress and "fitting the sentence margin"):
        pieces = instruction_pieces(fmt, [texts[j] for j in idx])
        for j, t, p in zip(idx, tokens, pieces):
            v, offset = scorers[j][0]
            s = window_scores(np.einsum("tsd,sd->t", t.double().numpy(), v), width, offset)
            last[j], earlier[j] = last_and_earlier(s, sentence_ends(p), guard.threshold)
    return fit_margin(last, earlier, [group for _, group in scorers], guard.sentence_budget)
