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

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..collect import check_reads
from ..surface import SURFACE_EDITS, SurfaceInvariance, surface_change_rate, surface_variants
from .features import iter_prompt_states

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
    """

    name: str
    prompts: list[str]
    label: int
    evaluate: bool = True
    group: str | None = None

    @property
    def origin(self) -> str:
        return self.group or self.name

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"source {self.name!r}: label must be 1 (harmful) or 0 (harmless), got {self.label!r}")
        if not self.prompts:
            raise ValueError(f"source {self.name!r} has no prompts")


@dataclass(frozen=True)
class GuardDesign:
    """How to build a guard from training sources: what a :class:`LatentGuard` reads and how it
    is fitted, plus which sources it may learn from.

    Args:
        name: the design's name in tables.
        method: ``"paper"`` or ``"linear"`` (see :class:`LatentGuard`).
        reads: where states are read (see :data:`~pyvene_harm.collect.READS`).
        layers: state indices; None = all.
        augment: fit on surface variants of every training prompt as well.
        C: the linear read-out's strength; None = chosen by cross-validation over the training
            sources (folds by source).
        rank: principal directions the linear read-out works in (None = all).
        train_on: names of the sources it may be fitted on (None = all); a narrower pool shows
            what broad pools add.
        mine_negatives: after a first fit, add this many prompts of the training-only harmless
            pools that the guard scores most harmful (its own false positives) and refit.
        balance_sources: weight prompts so that every source has the same say within its class.
    """

    name: str
    method: str = "paper"
    reads: tuple[str, ...] = ("t_inst",)
    layers: tuple[int, ...] | None = None
    augment: bool = False
    C: float | None = None
    rank: int | None = 256
    train_on: tuple[str, ...] | None = None
    mine_negatives: int = 0
    balance_sources: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", tuple(check_reads(self.reads)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        if self.method not in ("paper", "linear"):
            raise ValueError(f"design {self.name!r}: unknown method {self.method!r}: use paper or linear")
        if self.mine_negatives < 0:
            raise ValueError(f"design {self.name!r}: mine_negatives must be >= 0")

    def estimator(self, layers: Sequence[int]) -> Any:
        """An unfitted :class:`LatentGuard` for precomputed states of ``layers``."""
        from .latent import LatentGuard

        return LatentGuard(method=self.method, reads=self.reads, layers=list(layers), C=self.C, rank=self.rank)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reads"] = list(self.reads)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["train_on"] = list(self.train_on) if self.train_on is not None else None
        return d


DESIGNS: dict[str, str] = {
    "paper": "method=paper,reads=t_inst",
    "paper-mean": "method=paper,reads=mean_inst",
    "linear-tinst-aug": "method=linear,reads=t_inst,layers=middle,augment=1",
    "linear-mean": "method=linear,reads=mean_inst,layers=middle",
    "linear-mean-aug": "method=linear,reads=mean_inst,layers=middle,augment=1",
    "linear-last16-aug": "method=linear,reads=last:16,layers=middle,augment=1",
    "linear-post1-aug": "method=linear,reads=post:1,layers=middle,augment=1",
    "linear-mean-tpost-aug": "method=linear,reads=mean_inst+t_post_inst,layers=middle,augment=1",
}
"""Named designs (``--design NAME``), as the ``key=value`` specs :func:`parse_design` reads.

``paper`` is the paper's guard (centroid gap at t_inst, every state); the others vary one thing
at a time: where the states are read (the mean over the instruction's tokens, its last 16
tokens, the first post-instruction token, t_post_inst beside the mean), a logistic read-out over
the middle states instead of centroids, and fitting on surface variants (``-aug``).
"""


def middle_states(n_states: int) -> tuple[int, ...]:
    """Every other state from a third to two thirds of the depth (``layers=middle``).

    Harmfulness is linearly readable in the middle of the network; early states still mostly
    encode the tokens themselves (surface form) and late ones the reply being prepared. For the
    0.5B demo model (25 states): 8, 10, 12, 14, 16.
    """
    if n_states < 3:
        raise ValueError(f"layers=middle needs a model with at least 3 states, got {n_states}")
    lo, hi = round(n_states / 3), round(2 * n_states / 3)
    return tuple(range(lo, max(hi, lo + 1), 2))


def parse_design(text: str, n_states: int | None = None) -> GuardDesign:
    """A design from a preset name (:data:`DESIGNS`), or ``name:key=value,key=value`` (keys:
    method, reads (``+`` between reads), layers (``8-16``, ``8+12+16``, ``middle`` or ``all``),
    augment, C, rank, train_on (``+`` between source names), mine_negatives, balance_sources).

    Example:
        >>> parse_design("mine:method=linear,reads=mean_inst+t_post_inst,layers=8-16,augment=1").reads
        ('mean_inst', 't_post_inst')
    """
    name, sep, spec = text.partition(":")
    name = name.strip()
    if not sep:
        if name not in DESIGNS:
            raise ValueError(f"unknown design {name!r}: use one of {', '.join(DESIGNS)} or NAME:key=value,...")
        spec = DESIGNS[name]
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"design {text!r}: {part!r} is not key=value")
        key, value = key.strip(), value.strip()
        if key == "method":
            kwargs[key] = value
        elif key in ("reads", "train_on"):
            kwargs[key] = tuple(v for v in value.split("+") if v)
        elif key == "layers" and value == "middle":
            if n_states is None:
                raise ValueError(f"design {text!r}: layers=middle needs the model's number of states; give layers")
            kwargs[key] = middle_states(n_states)
        elif key == "layers":
            kwargs[key] = None if value == "all" else _parse_ints(value, text)
        elif key in ("augment", "balance_sources"):
            kwargs[key] = value.lower() in ("1", "true", "yes", "on")
        elif key == "C":
            kwargs[key] = None if value.lower() in ("auto", "cv", "none") else float(value)
        elif key in ("mine_negatives", "rank"):
            kwargs[key] = None if value.lower() in ("all", "none") else int(value)
        else:
            raise ValueError(f"design {text!r}: unknown key {key!r}")
    design = GuardDesign(name, **kwargs)
    if n_states is not None and design.layers is not None:
        bad = [x for x in design.layers if not 0 <= x < n_states]
        if bad:
            raise ValueError(f"design {name!r}: layer {bad[0]} is out of range (states 0-{n_states - 1})")
    return design


def _parse_ints(value: str, text: str) -> tuple[int, ...]:
    out: set[int] = set()
    try:
        for part in re.split(r"[;+]", value):
            a, dash, b = part.partition("-")
            out.update(range(int(a), int(b) + 1) if dash else [int(a)])
    except ValueError:
        raise ValueError(f"design {text!r}: cannot read layers {value!r} (use 8-16 or 8+12+16)") from None
    return tuple(sorted(out))


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

    def select(self, reads: Sequence[str], layers: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """``[len(rows), len(reads) * len(layers), d]`` float64, read-major (a guard's layout)."""
        r = [self.reads.index(x) for x in reads]
        s = [self.states.index(x) for x in layers]
        sub = self.x[np.asarray(rows, dtype=int)][:, r][:, :, s]
        return sub.reshape(len(rows), len(r) * len(s), -1).astype(np.float64)

    def original_rows(self) -> list[int]:
        return [i for i, (_, e) in enumerate(self.rows) if e is None]


def collect_source_states(model: Any, formatter: Any, source: PromptSource, *, reads: Sequence[str],
                          states: Sequence[int], edits: Sequence[str] = SURFACE_EDITS,
                          n_variants: int | None = None, batch_size: int = 16,
                          progress: bool | str = False) -> SourceStates:
    """States of a source's prompts and of the surface variants of its first ``n_variants``
    prompts (all by default), one early-exit prefill each, stored as float16.

    Variants identical to their prompt are not run again.
    """
    reads, states = tuple(check_reads(reads)), tuple(sorted(set(states)))
    rows: list[tuple[int, str | None]] = [(i, None) for i in range(len(source.prompts))]
    texts = list(source.prompts)
    limit = len(source.prompts) if n_variants is None else min(n_variants, len(source.prompts))
    for i in range(limit):
        for edit, text in surface_variants(source.prompts[i], edits).items():
            if text != source.prompts[i]:
                rows.append((i, edit))
                texts.append(text)
    x = None
    for idx, batch in iter_prompt_states(model, formatter, texts, states, batch_size=batch_size,
                                         progress=progress, reads=reads):
        if x is None:
            x = np.empty((len(texts), len(reads), len(states), batch.shape[-1]), np.float16)
        x[idx] = batch.reshape(len(idx), len(reads), len(states), -1).to(torch.float16).numpy()
    return SourceStates(source=source, x=x, rows=rows, reads=reads, states=states, texts=texts)


# --------------------------------------------------------------------------- folds


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


@dataclass
class CrossvalResult:
    """Per held-out source and design: accuracy on its prompts and the surface flip rate."""

    rows: list[dict[str, Any]]
    designs: list[dict[str, Any]]
    pooled_auc: dict[str, float] = field(default_factory=dict)
    """Per design: ROC AUC of every held-out score, harmful against harmless sources, each score
    from the fold that left its source out. High AUC with low accuracy on some sources means
    their scores shift between sources (the threshold does not transfer); low AUC means the
    states do not separate them."""


def _training(blocks: dict[str, SourceStates], held: str, design: GuardDesign, layers: Sequence[int],
              held_texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs, ys, gs = [], [], []
    origin = blocks[held].source.origin if held is not None else None
    for name, b in blocks.items():
        if (b.source.origin == origin or not b.source.evaluate
                or (design.train_on is not None and name not in design.train_on)):
            continue
        rows = [i for i, (_, e) in enumerate(b.rows) if e is None or design.augment]
        prompt_of = np.asarray([b.rows[i][0] for i in rows])
        drop = overlapping(b.source.prompts, held_texts)
        rows = [r for r, p in zip(rows, prompt_of) if not drop[p]]
        if not rows:
            continue
        xs.append(b.select(design.reads, layers, rows))
        ys += [b.source.label] * len(rows)
        gs += [name] * len(rows)
    if not xs or len(set(ys)) < 2:
        raise ValueError(f"design {design.name!r} without {held!r} has no training prompts of both classes: "
                         "add sources (or widen train_on)")
    return np.concatenate(xs), np.asarray(ys), np.asarray(gs)


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
               held_texts: Sequence[str] = ()) -> Any:
    """A guard of ``design`` fitted on every source but ``held`` (None: on all of them), with
    its negatives mined from the training-only pools when the design asks for it."""
    layers = design.layers if design.layers is not None else next(iter(blocks.values())).states
    x, y, g = _training(blocks, held, design, layers, held_texts)
    w = _weights(y, g) if design.balance_sources else None
    guard = design.estimator(layers).fit(x, y, groups=g, sample_weight=w)
    origin = blocks[held].source.origin if held is not None else None
    pools = [b for n, b in blocks.items() if not b.source.evaluate and b.source.label == 0
             and b.source.origin != origin and (design.train_on is None or n in design.train_on)]
    if design.mine_negatives and pools:
        cand = np.concatenate([b.select(design.reads, layers, b.original_rows()) for b in pools])
        names = [n for b in pools for n in [b.source.name] * len(b.original_rows())]
        texts = [b.source.prompts[b.rows[i][0]] for b in pools for i in b.original_rows()]
        keep = ~overlapping(texts, held_texts)
        cand, names = cand[keep], np.asarray(names)[keep]
        top = np.argsort(-guard.decision_function(cand), kind="stable")[:design.mine_negatives]
        x = np.concatenate([x, cand[top]])
        y = np.concatenate([y, np.zeros(len(top), int)])
        g = np.concatenate([g, names[top]])
        w = _weights(y, g) if design.balance_sources else None
        guard = design.estimator(layers).fit(x, y, groups=g, sample_weight=w)
    return guard


def cross_validate(blocks: dict[str, SourceStates], designs: Sequence[GuardDesign], *,
                   progress: Callable[[str], None] | None = None) -> CrossvalResult:
    """Leave each evaluation source out in turn: fit every design on the others, score it.

    Returns one row per (held-out source, design): accuracy on the source's prompts, surface
    flip rate over its variants, the fitted read-out's chosen ``C``, and ``auc_vs_other_class``:
    how well its held-out scores rank against every held-out score of the other class; and per
    design the AUC of all held-out scores pooled.
    """
    rows = []
    scores: dict[tuple[str, str], np.ndarray] = {}
    for held, b in blocks.items():
        if not b.source.evaluate:
            continue
        for design in designs:
            if progress is not None:
                progress(f"{design.name} without {held}")
            guard = fit_design(blocks, design, held=held, held_texts=b.source.prompts)
            layers = guard.states_
            x = b.select(design.reads, layers, range(len(b.rows)))
            decision = guard.decision_function(x)
            pred = decision > 0
            orig = b.original_rows()
            base = {b.rows[i][0]: pred[i] for i in orig}
            edited: dict[str, list] = {}
            before: dict[str, list] = {}
            for i, (p, e) in enumerate(b.rows):
                if e is not None:
                    edited.setdefault(e, []).append(pred[i])
                    before.setdefault(e, []).append(base[p])
            inv = _flip_rate(before, edited) if edited else None
            scores[(held, design.name)] = decision[orig]
            rows.append({"source": held, "label": b.source.label, "design": design.name, "n": len(orig),
                         "accuracy": float((pred[orig] == bool(b.source.label)).mean()),
                         "surface_flip_rate": None if inv is None else inv.rate,
                         "surface_flips": None if inv is None else inv.per_edit,
                         "n_variants": 0 if inv is None else inv.n_pairs,
                         "C": None if guard.readout_ is None else guard.readout_.C})
    pooled = {}
    for design in designs:
        parts = {lab: [v for (src, d), v in scores.items() if d == design.name and blocks[src].source.label == lab]
                 for lab in (0, 1)}
        if parts[0] and parts[1]:
            by_label = {lab: np.concatenate(v) for lab, v in parts.items()}
            pooled[design.name] = _auc(by_label[1], by_label[0])
            for r in rows:
                if r["design"] == design.name:  # this source against every held-out source of the other class
                    own, other = scores[(r["source"], design.name)], by_label[1 - r["label"]]
                    r["auc_vs_other_class"] = _auc(own, other) if r["label"] else _auc(other, own)
    return CrossvalResult(rows=rows, designs=[d.as_dict() for d in designs], pooled_auc=pooled)


def _auc(harmful: np.ndarray, harmless: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    return float(roc_auc_score(y, np.r_[harmful, harmless]))


def best_design(rows: Sequence[dict], *, without: str | None = None) -> str:
    """The design whose worst held-out accuracy over the sources (all, or all but ``without``)
    is highest; ties go to the higher mean. The targets ask for accuracy on *every* source, so
    the worst one decides."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["source"] != without:
            by.setdefault(r["design"], []).append(r["accuracy"])
    if not by:
        raise ValueError("no rows to choose a design from")
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


def _flip_rate(before: dict[str, list], edited: dict[str, list]) -> SurfaceInvariance:
    """Verdicts on the prompts (``before``) and on their edits, per edit -> the flip rate."""
    rates = [surface_change_rate(before[e], {e: edited[e]}) for e in edited]
    n = sum(r.n_pairs for r in rates)
    flips = sum(r.rate * r.n_pairs for r in rates)
    return SurfaceInvariance(rate=flips / n, per_edit={e: r.rate for e, r in zip(edited, rates)}, n_pairs=n)
