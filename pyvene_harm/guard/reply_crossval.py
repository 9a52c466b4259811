"""Judging reply-guard designs on prompt sources they were not fitted on (leave one source out).

Every reply gets an out-of-fold score from the fit that left its own source out (a source's
harmful replies and its refusals go out together: they answer the same prompts). Per source and
class, its replies are then taken against every out-of-fold reply of the other class (AUROC,
AUPRC, F1, FPR, recall at 1% FPR). The text controls (``ngram``, ``length``) read the reply's
words only and are scored the same way.

With ``kinds`` and ``balance="kind"`` each fold is fitted as ``guard reply-fit`` fits the guard it
ships (harmful replies, refusals and replies to harmless prompts weigh as kinds, not by count), so
the design chosen here is judged with the weighting it will be shipped with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .controls import TextControl
from .metrics import against_other_class, pooled_metrics
from .reply import ReplyGuard
from .reply_fit import BALANCES, held_out_units, kind_weights

__all__ = ["ReplyDesign", "cross_validate_replies", "parse_reply_design"]


@dataclass(frozen=True)
class ReplyDesign:
    """One candidate: the states read and the window width (or a text control)."""

    states: tuple[int, ...] = ()
    width: int = 16
    control: str | None = None

    @property
    def name(self) -> str:
        if self.control:
            return self.control
        return f"s{'+'.join(map(str, self.states))}/w{self.width}"


def parse_reply_design(text: str) -> ReplyDesign:
    """``ngram``, ``length`` or ``STATES/WIDTH`` (e.g. ``12/16``, ``8+12/32``)."""
    text = text.strip()
    if text in ("ngram", "length"):
        return ReplyDesign(control=text)
    head, sep, width = text.partition("/")
    try:
        states = tuple(int(s) for s in head.split("+"))
        return ReplyDesign(states=states, width=int(width) if sep else 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a reply design: use ngram, length or STATES/WIDTH, e.g. 12/16 or "
                         "8+12/32") from None


def cross_validate_replies(sources: Sequence[str], labels: Sequence[int], replies: Sequence[str],
                           states: dict[int, Sequence[np.ndarray]], designs: Sequence[ReplyDesign], *,
                           min_tokens: int = 8, n_boot: int = 300, kinds: Sequence[str] | None = None,
                           balance: str = "none", together: Sequence[Sequence[str]] = (),
                           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Out-of-fold scores and figures per design.

    Args:
        states: state id -> per reply ``[T, d]`` states (the union of what the designs read).
        together: groups of sources each fold leaves out as one (:func:`held_out_units`); the
            figures are still given per source.
        kinds: per reply, its kind (:data:`pyvene_harm.guard.reply_set.KINDS`); needed for
            ``balance="kind"``. The text controls are fitted unweighted either way.
    Returns:
        ``{"rows": [...], "pooled": {design: metrics}, "delay": {design: {...}}, "scores": {design: [...]}}``.
    """
    src = np.asarray(sources, dtype=object)
    y = np.asarray(labels).astype(int)
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    weights = None
    if balance == "kind":
        if kinds is None or len(kinds) != len(y):
            raise ValueError("balance='kind' needs one kind per reply")
        weights = kind_weights(kinds, y)
    names = sorted(set(src.tolist()))
    units = held_out_units(sources, together, y)
    out_rows, pooled, delays, all_scores = [], {}, {}, {}
    for design in designs:
        score = np.full(len(y), np.nan)
        first: list[int | None] = [None] * len(y)
        # per reply [T, S, d]: stacked once per design, not once per fold
        x = None if design.control else [np.stack([states[s][i] for s in design.states], axis=1)
                                          for i in range(len(y))]
        for held in sorted(set(units.tolist())):
            test = np.flatnonzero(units == held)
            train = np.flatnonzero(units != held)
            if progress is not None:
                progress(f"{design.name} without {held}")
            if design.control:
                ctl = TextControl(design.control).fit([replies[i] for i in train], y[train],
                                                      groups=src[train].tolist())
                score[test] = ctl.decision_function([replies[i] for i in test])
                continue
            g = ReplyGuard(states=design.states, width=design.width, min_tokens=min_tokens)
            g.fit([x[i] for i in train], y[train], groups=src[train].tolist(),
                  sample_weight=None if weights is None else weights[train])
            score[test] = g.decision_function([x[i] for i in test])
            for i, f in zip(test, g.first_flagged([x[i] for i in test])):
                first[i] = f
        all_scores[design.name] = score.tolist()
        pooled[design.name] = pooled_metrics(score[y == 1], score[y == 0], n_boot=n_boot)
        for held in names:
            for lab in (1, 0):
                own = score[(src == held) & (y == lab)]
                if len(own):
                    m = against_other_class(lab, own, score[y == 1 - lab], n_boot=n_boot)
                    out_rows.append({"design": design.name, "source": held, "class": "harmful" if lab else "safe",
                                     **{k: v for k, v in m.items() if k != "ci"}})
        if not design.control:
            caught = [f for f, lab in zip(first, y) if lab == 1 and f is not None]
            cut = [f for f, lab in zip(first, y) if lab == 0 and f is not None]
            delays[design.name] = {
                "harmful_caught": len(caught), "harmful": int(y.sum()),
                "median_delay": float(np.median(caught)) + 1 if caught else None,
                "p90_delay": float(np.percentile(caught, 90)) + 1 if caught else None,
                "safe_cut_short": len(cut), "safe": int((1 - y).sum())}
    return {"rows": out_rows, "pooled": pooled, "delay": delays, "scores": all_scores}
