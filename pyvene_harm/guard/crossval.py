"""Judging a guard design on prompt sources it was not fitted on (leave one source out).

A guard that is fitted and scored on prompts of the same sets learns whatever separates those
sets, surface form included (AdvBench requests end in a word, Alpaca instructions in a period).
The honest figure is accuracy on a *source* the guard never saw: fit on every source but one,
score the one left out, for every source. Everything a design decides (reads, layers, the
read-out's regularisation, the threshold) is decided inside the training sources, never on the
held-out one. Training prompts that equal, or appear inside, a held-out prompt (a request
wrapped in a jailbreak template) and vice versa are dropped, so no request is seen on both sides.

The costly part, the model's states, is computed once per prompt (and per surface variant) for
the union of what the designs read (:func:`collect_source_states`); every design and fold then
works on those arrays (:func:`cross_validate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..collect import collect_token_states
from ..reads import check_reads, fixed_reads
from ..surface import (
    ALL_EDITS,
    SHIFT_EDITS,
    SURFACE_EDITS,
    SurfaceInvariance,
    surface_change_rate,
    surface_variants,
)
from .design_fit import (
    design_features,
    design_scan_width,
    design_sentence_width,
    fit_design,
    overlapping,
    scan_decisions,
    sentence_decisions,
)
from .designs import DESIGNS, GuardDesign, middle_states, parse_design
from .features import iter_prompt_states
from .metrics import AGAINST_KEYS, against_other_class, binary_metrics, pooled_metrics

__all__ = [
    "DESIGNS",
    "CrossvalResult",
    "best_design",
    "GuardDesign",
    "PromptSource",
    "SourceStates",
    "collect_source_states",
    "cross_validate",
    "middle_states",
    "overlapping",
    "parse_design",
    "selected_rows",
]


@dataclass(frozen=True)
class PromptSource:
    """A named set of prompts with one label.

    Args:
        name: how tables call it.
        prompts: the prompts.
        label: 1 harmful, 0 harmless.
        evaluate: False for a training-only pool (e.g. a large harmless set to mine hard
            negatives from): it is never held out or scored.
        group: the source this one is part of (e.g. the training split of a held-out set): it is
            left out of fitting whenever a source of the same group is held out. None: its name.
        train: False for a *shift* source (e.g. requests in other languages): scored by every
            design fitted on all the trainable sources, never fitted on, so it measures a shift
            no training set covers.
    """

    name: str
    prompts: list[str]
    label: int
    evaluate: bool = True
    group: str | None = None
    train: bool = True

    @property
    def origin(self) -> str:
        return self.group or self.name

    def __post_init__(self) -> None:
        if not self.train and not self.evaluate:
            raise ValueError(f"source {self.name!r}: a source that is neither fitted on nor scored is of no use")
        if self.label not in (0, 1):
            raise ValueError(f"source {self.name!r}: label must be 1 (harmful) or 0 (harmless), got {self.label!r}")
        if not self.prompts:
            raise ValueError(f"source {self.name!r} has no prompts")


# --------------------------------------------------------------------------- states


@dataclass
class SourceStates:
    """The states of one source's prompts and of their surface variants.

    ``x[i]`` is ``[len(reads), len(states), d]`` for row ``i``; ``rows[i] = (prompt index,
    edit)`` with edit None for the prompt as given.
    """

    source: PromptSource
    x: np.ndarray
    rows: list[tuple[int, str | None]]
    reads: tuple[str, ...]
    states: tuple[int, ...]
    texts: list[str] = field(default_factory=list)
    tokens: list[np.ndarray] | None = None
    """Per row, ``[T, len(states), d]`` float16 states at each of its instruction tokens (what a
    ``scan:K`` design scores every window of); None when no design needs them."""
    ends: list[np.ndarray] | None = None
    """Per row, its instruction tokens that end a sentence, the last always among them (what a
    ``sent:K`` design reads, :mod:`~pyvene_harm.sentences`); None when no design needs them."""

    def select(self, reads: Sequence[str], layers: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """``[len(rows), len(reads) * len(layers), d]`` float64, read-major (a guard's layout);
        a ``scan:K`` read is its last window here (``last:K``)."""
        r = [self.reads.index(x) for x in fixed_reads(reads)]
        s = [self.states.index(x) for x in layers]
        sub = self.x[np.asarray(rows, dtype=int)][:, r][:, :, s]
        return sub.reshape(len(rows), len(r) * len(s), -1).astype(np.float64)

    def original_rows(self) -> list[int]:
        return [i for i, (_, e) in enumerate(self.rows) if e is None]

    def token_states(self, row: int, layers: Sequence[int]) -> np.ndarray:
        """``[T, len(layers), d]`` float32 states at the instruction tokens of ``row``."""
        if self.tokens is None:
            raise ValueError(f"source {self.source.name!r} was collected without its token states: a scan design "
                             "needs them (collect_source_states(..., tokens=True))")
        return self.tokens[row][:, [self.states.index(x) for x in layers]].astype(np.float32)

    def sentence_ends(self, row: int) -> np.ndarray:
        """Indices (from the instruction's first token) of the tokens of ``row`` that end a sentence."""
        if self.ends is None:
            raise ValueError(f"source {self.source.name!r} was collected without its sentence ends: a sent design "
                             "needs them (SourceStates(..., ends=...))")
        return self.ends[row]


def row_sentence_ends(formatter: Any, texts: Sequence[str], tokens: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per row, its instruction tokens that end a sentence (:func:`~pyvene_harm.sentences.sentence_ends`),
    from its text; refuses rows whose token count is not that of their stored token states."""
    from ..sentences import instruction_pieces, sentence_ends

    pieces = instruction_pieces(formatter, texts)
    bad = next((i for i, (p, t) in enumerate(zip(pieces, tokens)) if len(p) != len(t)), None)
    if bad is not None:
        raise ValueError(f"row {bad} has {len(tokens[bad])} stored token states but {len(pieces[bad])} instruction "
                         "tokens now: the tokenizer or chat template changed since its states were stored")
    return [sentence_ends(p) for p in pieces]


def collect_source_states(model: Any, formatter: Any, source: PromptSource, *, reads: Sequence[str],
                          states: Sequence[int], edits: Sequence[str] = ALL_EDITS,
                          n_variants: int | None = None, batch_size: int = 16,
                          progress: bool | str = False, states_cache: Any = None,
                          tokens: bool = False, sentences: bool = False) -> SourceStates:
    """States of a source's prompts and of the surface variants (and shifts, see
    :data:`~pyvene_harm.surface.ALL_EDITS`) of its first ``n_variants`` prompts (all by
    default), one early-exit prefill each, stored as float16.

    Variants identical to their prompt are not run again. With a
    :class:`~pyvene_harm.guard.states_cache.StatesCache`, prompts it holds for the same model,
    rendering, reads and states cost no forward pass, and the ones computed are kept there, so a
    ``guard fit`` of a design with the same reads and states reuses them. With ``tokens`` the
    states at every instruction token are kept too (float16; for ``scan:K`` designs), from the
    same forward pass (the cache is then not used), and with ``sentences`` where each row's
    sentences end (for ``sent:K`` designs; implies ``tokens``).
    """
    reads, states = tuple(fixed_reads(check_reads(reads))), tuple(sorted(set(states)))
    rows: list[tuple[int, str | None]] = [(i, None) for i in range(len(source.prompts))]
    texts = list(source.prompts)
    limit = len(source.prompts) if n_variants is None else min(n_variants, len(source.prompts))
    for i in range(limit):
        for edit, text in surface_variants(source.prompts[i], edits).items():
            if text != source.prompts[i]:
                rows.append((i, edit))
                texts.append(text)
    if tokens or sentences:
        x, kept = None, [None] * len(texts)
        for idx, by_read, toks in collect_token_states(model, formatter, texts, states=states, positions=reads,
                                                       batch_size=batch_size, progress=progress):
            batch = torch.stack([by_read[r] for r in reads], dim=1)  # [b, R, S, d]
            if x is None:
                x = np.empty((len(texts), *batch.shape[1:]), np.float16)
            x[idx] = batch.to(torch.float16).numpy()
            for j, t in zip(idx, toks):
                kept[j] = t.to(torch.float16).numpy()
        ends = row_sentence_ends(formatter, texts, kept) if sentences else None
        return SourceStates(source=source, x=x, rows=rows, reads=reads, states=states, texts=texts, tokens=kept,
                            ends=ends)
    if states_cache is not None:
        got = states_cache.collect(model, formatter, texts, states, reads, batch_size=batch_size, progress=progress)
        x = got.reshape(len(texts), len(reads), len(states), -1).to(torch.float16).numpy()
        return SourceStates(source=source, x=x, rows=rows, reads=reads, states=states, texts=texts)
    x = None
    for idx, batch in iter_prompt_states(model, formatter, texts, states, batch_size=batch_size,
                                         progress=progress, reads=reads):
        if x is None:
            x = np.empty((len(texts), len(reads), len(states), batch.shape[-1]), np.float16)
        x[idx] = batch.reshape(len(idx), len(reads), len(states), -1).to(torch.float16).numpy()
    return SourceStates(source=source, x=x, rows=rows, reads=reads, states=states, texts=texts)


# --------------------------------------------------------------------------- folds


@dataclass
class CrossvalResult:
    """Per held-out source and design: accuracy on its prompts and the surface flip rate."""

    rows: list[dict[str, Any]]
    designs: list[dict[str, Any]]
    pooled: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per design: :func:`~pyvene_harm.guard.metrics.binary_metrics` of every held-out score
    pooled (shift sources aside), with bootstrap intervals under ``ci``."""
    shifts: list[dict[str, Any]] = field(default_factory=list)
    """Per design and shift (typos, leetspeak, ...): accuracy, recall, FPR and AUROC of the
    edited held-out prompts, each scored by the fold that left its source out."""
    pooled_auc: dict[str, float] = field(default_factory=dict)
    """Per design: ROC AUC of every held-out score, harmful against harmless sources, each score
    from the fold that left its source out. High AUC with low accuracy on some sources means
    their scores shift between sources (the threshold does not transfer); low AUC means the
    states do not separate them."""


@dataclass
class _Scored:
    """One design's held-out decisions on one source (every row: prompts and variants)."""

    block: SourceStates
    decision: np.ndarray
    fit_C: float | None
    margin: float | None = None
    """A ``sent:K`` design's fitted ``sentence_margin_`` in this fold (None for other designs)."""

    @property
    def label(self) -> int:
        return self.block.source.label

    def original(self) -> np.ndarray:
        return self.decision[self.block.original_rows()]

    def edited(self, edit: str) -> np.ndarray:
        return self.decision[[i for i, (_, e) in enumerate(self.block.rows) if e == edit]]


def _score_held_out(blocks: dict[str, SourceStates], design: GuardDesign, held: str,
                    shared: dict | None = None) -> _Scored:
    b = blocks[held]
    fit_on = None if not b.source.train else held  # a shift source is never trained on: fit on all
    guard = fit_design(blocks, design, held=fit_on, held_texts=b.source.prompts, shared=shared)
    all_rows = range(len(b.rows))
    if design.is_control:
        decision = guard.decision_function(design_features(b, design, (), all_rows))
        fit_C = guard.C_
    elif design_scan_width(design) is not None:
        decision = scan_decisions(guard, [(b, i) for i in all_rows], design_scan_width(design))
        fit_C = guard.readout_.C
    elif design_sentence_width(design) is not None:
        decision = sentence_decisions(guard, [(b, i) for i in all_rows], design_sentence_width(design))
        return _Scored(block=b, decision=np.asarray(decision, dtype=np.float64), fit_C=guard.readout_.C,
                       margin=float(guard.sentence_margin_))
    else:
        decision = guard.decision_function(b.select(design.reads, guard.states_, all_rows))
        fit_C = None if guard.readout_ is None else guard.readout_.C
    return _Scored(block=b, decision=np.asarray(decision, dtype=np.float64), fit_C=fit_C)


def cross_validate(blocks: dict[str, SourceStates], designs: Sequence[GuardDesign], *,
                   progress: Callable[[str], None] | None = None, n_boot: int = 300) -> CrossvalResult:
    """Leave each evaluation source out in turn: fit every design on the others, score it.
    Shift sources (``train=False``) are scored by each design fitted on every trainable source.

    Returns one row per (held-out source, design): accuracy at the design's threshold (with a
    bootstrap interval), the surface flip rate over its punctuation and case variants, accuracy
    on each shift (typos, leetspeak, ...) of its prompts, the fitted ``C``, and this source's
    prompts against every held-out prompt of the other class (each scored by the fold that left
    its own source out): precision, recall, F1, FPR, AUROC, AUPRC and recall at 1% / 5% FPR.
    For a harmless source, recall at 1% FPR is the recall on all held-out harmful prompts at
    the threshold that flags 1% of *this* source: what a deployment that calibrates on its own
    traffic would get. Per design, the same figures over every held-out prompt pooled, and per
    shift the AUROC of edited harmful against edited harmless prompts.
    """
    scored: dict[tuple[str, str], _Scored] = {}
    for held, b in blocks.items():
        if not b.source.evaluate:
            continue
        shared: dict = {}  # one fit per fold for designs that differ only in how it is read
        for design in designs:
            if progress is not None:
                progress(f"{design.name} {'without' if b.source.train else 'on'} {held}")
            scored[(held, design.name)] = _score_held_out(blocks, design, held, shared)
    rows, pooled, shifts = [], {}, []
    for design in designs:
        mine = {src: sc for (src, d), sc in scored.items() if d == design.name}
        loso = {src: sc for src, sc in mine.items() if sc.block.source.train}
        by_label = {lab: np.concatenate([sc.original() for sc in loso.values() if sc.label == lab] or [np.empty(0)])
                    for lab in (0, 1)}
        m = pooled_metrics(by_label[1], by_label[0], n_boot=n_boot)
        if m is not None:
            pooled[design.name] = m
        for src, sc in mine.items():
            rows.append(_row(src, design, sc, mine, by_label, n_boot))
        for edit in SHIFT_EDITS:
            parts = {lab: [sc.edited(edit) for sc in loso.values() if sc.label == lab] for lab in (0, 1)}
            ed = {lab: np.concatenate(v) if v else np.empty(0) for lab, v in parts.items()}
            if len(ed[0]) + len(ed[1]):
                m = binary_metrics(np.r_[np.ones(len(ed[1])), np.zeros(len(ed[0]))], np.r_[ed[1], ed[0]])
                shifts.append({"design": design.name, "shift": edit, "n": m["n"], "accuracy": m["accuracy"],
                               "recall": m["recall"], "fpr": m["fpr"], "auroc": m["auroc"]})
    return CrossvalResult(rows=rows, designs=[d.as_dict() for d in designs],
                          pooled_auc={d: m["auroc"] for d, m in pooled.items()}, pooled=pooled, shifts=shifts)


def _row(src: str, design: GuardDesign, sc: _Scored, mine: dict[str, _Scored], by_label: dict[int, np.ndarray],
         n_boot: int) -> dict[str, Any]:
    b, own = sc.block, sc.original()
    label = b.source.label
    if b.source.train:
        other = by_label[1 - label]
    else:  # a shift source against the shift sources of the other class, if any
        same_kind = [o.original() for o in mine.values() if not o.block.source.train and o.label != label]
        other = np.concatenate(same_kind) if same_kind else by_label[1 - label]
    pred = own > 0
    base = {b.rows[i][0]: pred[j] for j, i in enumerate(b.original_rows())}
    before: dict[str, list] = {}
    after: dict[str, list] = {}
    shift_acc: dict[str, float] = {}
    for edit in SURFACE_EDITS:
        idx = [i for i, (_, e) in enumerate(b.rows) if e == edit]
        if idx:
            before[edit] = [base[b.rows[i][0]] for i in idx]
            after[edit] = list(sc.decision[idx] > 0)
    for edit in SHIFT_EDITS:
        d = sc.edited(edit)
        if len(d):
            shift_acc[edit] = float(((d > 0) == bool(label)).mean())
    inv = _flip_rate(before, after) if after else None
    m = against_other_class(label, own, other, n_boot=n_boot, interval_keys=("auroc", "tpr_at_1pct_fpr", "f1"))
    return {"source": src, "label": label, "design": design.name, "n": len(own), "shift_source": not b.source.train,
            "control": design.is_control,
            "accuracy": m["accuracy"], "accuracy_ci": m["accuracy_ci"],
            "surface_flip_rate": None if inv is None else inv.rate,
            "surface_flips": None if inv is None else inv.per_edit,
            "n_variants": 0 if inv is None else inv.n_pairs,
            "shift_accuracy": shift_acc,
            "C": sc.fit_C,
            **({} if sc.margin is None else {"sentence_margin": sc.margin}),
            "vs_other_class": {k: m[k] for k in (*AGAINST_KEYS, "n")},
            "vs_other_class_ci": m["ci"],
            "auc_vs_other_class": m["auroc"]}


def _flip_rate(before: dict[str, list], edited: dict[str, list]) -> SurfaceInvariance:
    """Verdicts on the prompts (``before``) and on their edits, per edit -> the flip rate."""
    rates = [surface_change_rate(before[e], {e: edited[e]}) for e in edited]
    n = sum(r.n_pairs for r in rates)
    flips = sum(r.rate * r.n_pairs for r in rates)
    return SurfaceInvariance(rate=flips / n, per_edit={e: r.rate for e, r in zip(edited, rates)}, n_pairs=n)


def best_design(rows: Sequence[dict], *, without: str | None = None) -> str:
    """The guard design whose worst held-out accuracy over the sources (all, or all but
    ``without``) is highest; ties go to the higher mean. The targets ask for accuracy on *every*
    source, so the worst one decides. Controls and shift sources take no part: a control is a
    yardstick, not a candidate, and a shift is judged apart."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["source"] != without and not r.get("control") and not r.get("shift_source"):
            by.setdefault(r["design"], []).append(r["accuracy"])
    if not by:
        raise ValueError("no rows of guard designs to choose from")
    return max(by, key=lambda d: (min(by[d]), sum(by[d]) / len(by[d])))


def selected_rows(rows: Sequence[dict], name: str = "selected") -> list[dict]:
    """Rows for design *selection* judged like fitting: for each held-out source, the row of the
    design :func:`best_design` picks from the other sources' accuracies.

    The held-out source's own accuracy never enters its choice, so these rows estimate what
    choosing a design this way gives on a source nobody looked at (the per-design rows flatter
    whichever design is later picked on them). The other sources' folds did train on the held-out
    source; a fully nested run (designs re-judged without it) costs sources-squared fits.
    """
    by = {(r["source"], r["design"]): r for r in rows}
    out = []
    for source in dict.fromkeys(r["source"] for r in rows):
        pick = best_design(rows, without=source)
        out.append({**by[(source, pick)], "design": name, "selected_design": pick})
    return out
