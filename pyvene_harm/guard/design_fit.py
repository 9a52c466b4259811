"""Fitting one guard design on the sources of a leave-one-source-out fold.

:func:`fit_design` turns the stored states of every training source (a
:class:`~pyvene_harm.guard.crossval.SourceStates` each) into a fitted guard, exactly as
``guard fit`` would from prompts: the design's rows (prompts, and their punctuation and case
edits when it augments), the highest windows of harmless prompts for a scan read, negatives mined
from the training-only pools, and last, for ``calibrate_max``, the maximum calibrated on
out-of-source maxima (:mod:`~pyvene_harm.guard.max_calibration`), or for a ``sent:K`` read the
margin its earlier sentence ends must clear (:mod:`~pyvene_harm.sentences`). Training prompts that equal or
contain a held-out prompt are dropped (:func:`overlapping`), so no request is on both sides.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..reads import fixed_reads, scan_width, sentence_width
from ..sentences import fit_margin, last_and_earlier, sentence_decision
from ..surface import SURFACE_EDITS
from ..windows import max_window_scores, top_windows, window_means, window_scores
from .designs import GuardDesign
from .max_calibration import OutOfGroupReadouts

if TYPE_CHECKING:
    from .crossval import SourceStates

__all__ = ["design_features", "design_scan_width", "design_sentence_width", "fit_design", "overlapping",
           "scan_decisions", "sentence_decisions"]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def overlapping(train: Sequence[str], held: Sequence[str]) -> np.ndarray:
    """``[len(train)]`` True where a training prompt equals a held-out prompt or one of them
    contains the other (case, punctuation and spacing ignored): a request inside a template."""
    held_n = [_norm(h) for h in held]
    joined = "\n".join(held_n)
    held_set = set(held_n)
    out = np.zeros(len(train), bool)
    for i, t in enumerate(train):
        tn = _norm(t)
        if not tn:
            continue
        out[i] = tn in held_set or tn in joined or any(h and h in tn for h in held_n if len(h) < len(tn))
    return out


def _training_rows(blocks: dict[str, SourceStates], held: str | None, design: GuardDesign,
                   held_texts: Sequence[str]) -> list[tuple[str, SourceStates, list[int]]]:
    """``(source name, block, rows)`` the design is fitted on without ``held``: every trainable
    source of another origin, its prompts and, for augmenting designs, their punctuation and case
    edits (the shifts are never trained on), less any prompt that is also a held-out prompt."""
    out = []
    origin = blocks[held].source.origin if held is not None else None
    for name, b in blocks.items():
        if (b.source.origin == origin or not b.source.evaluate or not b.source.train
                or not design.fits_on(name, b.source.origin)):
            continue
        rows = [i for i, (_, e) in enumerate(b.rows) if e is None or (design.augment and e in SURFACE_EDITS)]
        drop = overlapping(b.source.prompts, held_texts)
        rows = [r for r in rows if not drop[b.rows[r][0]]]
        if rows:
            out.append((name, b, rows))
    return out


def _training(picked: list[tuple[str, SourceStates, list[int]]], held: str | None, design: GuardDesign,
              layers: Sequence[int]) -> tuple[Any, np.ndarray, np.ndarray]:
    """What the design reads of the rows :func:`_training_rows` picked: states ``[n, F, d]``
    (prompts for a control), labels and source names."""
    xs, ys, gs = [], [], []
    for name, b, rows in picked:
        xs.append(design_features(b, design, layers, rows))
        ys += [b.source.label] * len(rows)
        gs += [name] * len(rows)
    if not xs or len(set(ys)) < 2:
        raise ValueError(f"design {design.name!r} without {held!r} has no training prompts of both classes: "
                         "add sources (or widen train_on)")
    return _concat(xs), np.asarray(ys), np.asarray(gs)


def design_features(b: SourceStates, design: GuardDesign, layers: Sequence[int], rows: Sequence[int]) -> Any:
    """What the design reads for ``rows`` of a block: their texts for a control, else states."""
    if design.is_control:
        if len(b.texts) != len(b.rows):
            raise ValueError(f"source {b.source.name!r} carries no texts of its rows: a control needs them")
        return [b.texts[i] for i in rows]
    return b.select(design.reads, layers, rows)


def _concat(parts: Sequence[Any]) -> Any:
    return [t for p in parts for t in p] if isinstance(parts[0], list) else np.concatenate(parts)


def _weights(y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Every source the same total weight within its class; classes as they are."""
    w = np.ones(len(y))
    for name in np.unique(g):
        m = g == name
        w[m] = 1.0 / m.sum()
    for label in (0, 1):
        m = y == label
        if m.any():
            w[m] *= m.sum() / w[m].sum()
    return w


def fit_design(blocks: dict[str, SourceStates], design: GuardDesign, *, held: str | None = None,
               held_texts: Sequence[str] = (), shared: dict | None = None) -> Any:
    """A guard of ``design`` fitted on every trainable source but ``held`` (None: on all of
    them), with its negatives mined from the training-only pools when the design asks for it,
    and a scan read's maximum calibrated last when it asks for that.

    ``shared`` (a dict kept across designs of one run) lets designs that differ only in how a
    ``last:K`` read-out is applied (``sent:K`` and its budget) share one fit and one set of
    refits per fold: the result is the same, once instead of once per design."""
    key = _shared_key(design, held, held_texts)
    if shared is None or key is None:
        return _fit_design(blocks, design, held, held_texts)
    if key not in shared:
        shared[key] = {"fit": _fit_design(blocks, design, held, held_texts, with_rows=True)}
    guard, picked, x, y, g, w = shared[key]["fit"]
    guard = copy.copy(guard)
    guard.reads, guard.reads_ = design.reads, tuple(design.reads)
    guard.sentence_margin_ = 0.0
    swidth = design_sentence_width(design)
    if swidth is not None and design.sentence_budget is not None:
        if "folds" not in shared[key]:
            shared[key]["folds"] = _refits(design, guard, x, y, g, w)
        guard.sentence_margin_ = _sentence_margin(picked, design, guard, shared[key]["folds"], swidth,
                                                  _margin_only_rows(blocks, held, design, held_texts))
    return guard


def _shared_key(design: GuardDesign, held: str | None, held_texts: Sequence[str]) -> str | None:
    """What a fit depends on, for the designs whose fit is a plain ``last:K`` read-out's (None for
    the others: controls, scan reads, calibrated maxima)."""
    if design.is_control or design_scan_width(design) is not None or design.calibrate_max:
        return None
    fields = {k: v for k, v in design.as_dict().items() if k not in ("name", "sentence_budget")}
    fields["reads"] = fixed_reads(design.reads)
    return json.dumps([held, list(held_texts), fields], sort_keys=True, default=str)


def _fit_design(blocks: dict[str, SourceStates], design: GuardDesign, held: str | None, held_texts: Sequence[str],
                *, with_rows: bool = False) -> Any:
    """:func:`fit_design` without sharing; with ``with_rows`` the guard before any sentence margin,
    and the rows its final fit saw: ``(guard, picked, x, y, g, w)``."""
    layers = design.layers if design.layers is not None else next(iter(blocks.values())).states
    picked = _training_rows(blocks, held, design, held_texts)
    x, y, g = _training(picked, held, design, layers)
    w = _weights(y, g) if design.balance_sources else None
    guard = _estimator(design, layers).fit(x, y, groups=g, sample_weight=w)
    width = design_scan_width(design)
    if width is not None and design.scan_negatives:
        wx, wg = _window_negatives(picked, design, layers, guard, width)
        if len(wx):
            x, y, g = np.concatenate([x, wx]), np.concatenate([y, np.zeros(len(wx), int)]), np.concatenate([g, wg])
            w = _weights(y, g) if design.balance_sources else None
            guard = _estimator(design, layers).fit(x, y, groups=g, sample_weight=w)
    origin = blocks[held].source.origin if held is not None else None
    pools = [b for n, b in blocks.items() if not b.source.evaluate and b.source.label == 0
             and b.source.origin != origin and design.fits_on(n, b.source.origin)]
    mined: list[tuple[str, SourceStates, list[int]]] = []
    if design.mine_negatives and pools:
        cand = _concat([design_features(b, design, layers, b.original_rows()) for b in pools])
        where = [(b, i) for b in pools for i in b.original_rows()]
        names = np.asarray([b.source.name for b, _ in where])
        texts = [b.source.prompts[b.rows[i][0]] for b, i in where]
        keep = np.flatnonzero(~overlapping(texts, held_texts))
        if width is not None:  # a pool prompt's score is its highest window's
            scores = scan_decisions(guard, [where[k] for k in keep], width)
        else:
            scores = guard.decision_function(_take(cand, keep))
        top = keep[np.argsort(-scores, kind="stable")[:design.mine_negatives]]
        x = _concat([x, _take(cand, top)])
        y = np.concatenate([y, np.zeros(len(top), int)])
        g = np.concatenate([g, names[top]])
        w = _weights(y, g) if design.balance_sources else None
        guard = _estimator(design, layers).fit(x, y, groups=g, sample_weight=w)
        mined = [(names[k], where[k][0], [where[k][1]]) for k in top]
    if design.calibrate_max:
        prompts = picked + mined
        folds = OutOfGroupReadouts.fit(guard.readout_, x, y.astype(bool), g, rank=design.rank, sample_weight=w)
        best = np.concatenate([_highest_windows([(b, i) for i in rows], guard.states_, *folds.projection(name), width)
                               for name, b, rows in prompts])
        labels = np.concatenate([np.full(len(rows), b.source.label == 1) for _, b, rows in prompts])
        groups = [name for name, _, rows in prompts for _ in rows]
        guard.readout_ = folds.calibrate(best, labels, groups, threshold=design.max_threshold)
        guard.calibrate_max = True
    if with_rows:  # the caller fits the margin, on refits it shares
        return guard, picked, x, y, g, w
    swidth = design_sentence_width(design)
    if swidth is not None:
        guard.sentence_margin_ = 0.0 if design.sentence_budget is None else _sentence_margin(
            picked, design, guard, _refits(design, guard, x, y, g, w), swidth,
            _margin_only_rows(blocks, held, design, held_texts))
    return guard


def _refits(design: GuardDesign, guard: Any, x: np.ndarray, y: np.ndarray, g: np.ndarray,
            w: np.ndarray | None) -> OutOfGroupReadouts:
    """The guard's read-out refitted without each fold of training sources (on the rows it saw)."""
    try:
        return OutOfGroupReadouts.fit(guard.readout_, x, y.astype(bool), g, rank=design.rank, sample_weight=w)
    except ValueError as err:
        raise ValueError(f"design {design.name!r}: its sentence margin is fitted like a calibrated maximum, on refits "
                         f"without each training source, and {err}") from None


def _margin_only_rows(blocks: dict[str, SourceStates], held: str | None, design: GuardDesign,
                      held_texts: Sequence[str]) -> list[tuple[str, SourceStates, list[int]]]:
    """``(source name, block, rows)`` of the design's ``margin_only`` sources in this fold: their
    prompts as written, less any that is also a held-out prompt or a prompt the read-out may have
    been fitted on (of any training source or pool: it would score it in-sample); none of the
    held-out source's origin (a held-out source is never looked at, not even by the margin)."""
    if design.margin_only is None:
        return []
    origin = blocks[held].source.origin if held is not None else None
    seen = [p for n, b in blocks.items() if b.source.train and n not in design.margin_only
            and b.source.origin != origin for p in b.source.prompts]
    out = []
    for name in design.margin_only:
        b = blocks[name]
        if b.source.origin == origin:
            continue
        drop = overlapping(b.source.prompts, [*held_texts, *seen])
        rows = [i for i, (k, e) in enumerate(b.rows) if e is None and not drop[k]]
        if rows:
            out.append((name, b, rows))
    return out


def _sentence_margin(picked: list[tuple[str, SourceStates, list[int]]], design: GuardDesign, guard: Any,
                     folds: OutOfGroupReadouts, width: int,
                     margin_only: Sequence[tuple[str, SourceStates, list[int]]] = ()) -> float:
    """The margin a ``sent:K`` design's earlier sentence ends must clear: every harmless training
    prompt (as written, not its edits) scored by the read-out refitted without its source
    (``folds``, on the final fit's rows), and every prompt of a ``margin_only`` source by the
    read-out itself (never fitted on it), the margin the smallest that keeps each harmless source
    within ``design.sentence_budget`` added flags (:func:`~pyvene_harm.sentences.fit_margin`)."""
    last, earlier, groups = [], [], []
    scored = [(name, b, rows, folds.projection(name)) for name, b, rows in picked if b.source.label == 0]
    scored += [(name, b, rows, guard.readout_.projection()) for name, b, rows in margin_only if b.source.label == 0]
    for name, b, rows, (v, offset) in scored:
        for i in rows:
            if b.rows[i][1] is not None:
                continue
            s = window_scores(np.einsum("tsd,sd->t", b.token_states(i, guard.states_), v), width, offset)
            one, best = last_and_earlier(s, b.sentence_ends(i), guard.threshold_)
            last.append(one)
            earlier.append(best)
            groups.append(name)
    return fit_margin(np.asarray(last), np.asarray(earlier), groups, design.sentence_budget)


def _estimator(design: GuardDesign, layers: Sequence[int]) -> Any:
    """The design's unfitted estimator for precomputed states: a calibrated maximum and a sentence
    margin are done by :func:`fit_design` from the blocks' token states, which a fit on states
    does not see."""
    est = design.estimator(layers)
    if design.calibrate_max:
        est.set_params(calibrate_max=False)
    if design.sentence_budget is not None:
        est.set_params(sentence_budget=None)
    return est


def design_scan_width(design: GuardDesign) -> int | None:
    """K of the design's ``scan:K`` read (its verdict is the highest window's), else None."""
    return None if design.is_control else scan_width(design.reads[0])


def design_sentence_width(design: GuardDesign) -> int | None:
    """K of the design's ``sent:K`` read (windows ending at sentence ends), else None."""
    return None if design.is_control else sentence_width(design.reads[0])


def _window_negatives(picked: list[tuple[str, SourceStates, list[int]]], design: GuardDesign,
                      layers: Sequence[int], guard: Any, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``design.scan_negatives`` highest-scoring windows (last one aside) of every harmless
    training row (of those :func:`_training_rows` picked), as :meth:`LatentGuard.fit` adds them
    for a ``scan:K`` read."""
    xs, gs = [], []
    for name, b, rows in picked:
        if b.source.label != 0:
            continue
        for i in rows:
            means = window_means(b.token_states(i, layers), width)
            for k in top_windows(guard.readout_.score(means), design.scan_negatives):
                xs.append(means[k])
                gs.append(name)
    if not xs:
        return np.zeros((0, len(layers), 0)), np.zeros(0, dtype=object)
    return np.stack(xs), np.asarray(gs)


def _highest_windows(where: Sequence[tuple[SourceStates, int]], states: Sequence[int], v: np.ndarray,
                     offset: float, width: int) -> np.ndarray:
    """``[n]`` each (block, row)'s highest window score under the read-out ``(v, offset)``."""
    proj = [np.einsum("tsd,sd->t", b.token_states(i, states), v) for b, i in where]
    return max_window_scores(proj, width, offset)[0]


def scan_decisions(guard: Any, where: Sequence[tuple[SourceStates, int]], width: int) -> np.ndarray:
    """``[n]`` each (block, row)'s highest window score minus the guard's threshold."""
    v, offset = guard.readout_.projection()
    return _highest_windows(where, guard.states_, v, offset, width) - guard.threshold_


def sentence_decisions(guard: Any, where: Sequence[tuple[SourceStates, int]], width: int) -> np.ndarray:
    """``[n]`` each (block, row)'s sentence-end decision (:func:`~pyvene_harm.sentences.sentence_decision`)
    under the guard's read-out, threshold and ``sentence_margin_``."""
    v, offset = guard.readout_.projection()
    out = np.empty(len(where))
    for k, (b, i) in enumerate(where):
        s = window_scores(np.einsum("tsd,sd->t", b.token_states(i, guard.states_), v), width, offset)
        out[k] = sentence_decision(s, b.sentence_ends(i), guard.threshold_, guard.sentence_margin_)[0]
    return out


def _take(x: Any, idx: Sequence[int]) -> Any:
    return [x[i] for i in idx] if isinstance(x, list) else x[np.asarray(idx, dtype=int)]
