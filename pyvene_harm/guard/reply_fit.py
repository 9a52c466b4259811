"""A reply guard to ship: fitted on every source, its threshold chosen on sources it had not seen.

A threshold read off the replies a guard was fitted on is too low a bar: those replies score
further from it than new ones will. So every reply first gets out-of-fold token scores from the fit
that left its own prompt source out (as ``guard reply-crossval`` scores), the threshold is the
lowest that flags at most ``max_safe_flagged`` of those safe replies, and the shipped read-out is
then fitted on all sources and cut at that threshold. The out-of-fold figures at that threshold
(recall, safe replies flagged, harmless replies cut short, detection delay) are what a new source
can expect, and travel in the artifact.

``balance="kind"`` weighs each kind of reply (harmful, the model's refusals, replies to harmless
prompts) as much as the others in the fit, whatever their counts: the safe side of a reply set is
mostly refusals, and a read-out fitted on those learns "the model complies" more than "the reply is
harmful".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import pooled_metrics
from .reply import ReplyGuard, scored_ends

__all__ = ["BALANCES", "fit_reply_guard", "held_out_units", "kind_weights", "out_of_fold_token_scores",
           "report_at_threshold", "threshold_for_safe_share"]

BALANCES = ("kind", "none")


def kind_weights(kinds: Sequence[str], labels: Sequence[int]) -> np.ndarray:
    """Per reply, a weight making each kind weigh as its class's share split evenly among the
    class's kinds (harmful kinds pooled as one: they are one class to the guard)."""
    y = np.asarray(labels).astype(int)
    group = [("harmful" if lab else k) for k, lab in zip(kinds, y)]
    counts = Counter(group)
    per_class = {0: len({g for g, lab in zip(group, y) if not lab}), 1: 1}
    w = np.array([(y == lab).sum() / (per_class[lab] * counts[g]) for g, lab in zip(group, y)], dtype=np.float64)
    return w * len(w) / w.sum()


def held_out_units(sources: Sequence[str], together: Sequence[Sequence[str]] = (),
                   labels: Sequence[int] | None = None) -> np.ndarray:
    """Per reply, the unit a fold leaves out with it: its source, or the group of ``together`` it is
    in (named by its sources joined with ``+``). With ``labels``, also checks that every fold
    still trains on both classes (a group holding all of one class leaves its fold none).

    Why groups: two sources that share what a read-out could key on (the same five languages, one
    harmful and one harmless) teach a fit that leaves only one of them out that the language itself
    is the label; leaving them out together asks the question a new deployment asks.
    """
    src = np.asarray(sources, dtype=object)
    present = set(src.tolist())
    unit = {s: s for s in present}
    seen: set[str] = set()
    for group in together:
        names = [g.strip() for g in group]
        missing = sorted(set(names) - present)
        if missing:
            raise ValueError(f"held-out group {'+'.join(names)} names sources the replies do not have: "
                             f"{', '.join(missing)} (sources: {', '.join(sorted(present))})")
        if len(set(names)) < 2:
            raise ValueError(f"a held-out group needs two sources or more, got {'+'.join(names)}")
        twice = sorted(seen & set(names))
        if twice:
            raise ValueError(f"source(s) {', '.join(twice)} are in two held-out groups: each may be in one")
        seen |= set(names)
        for name in names:
            unit[name] = "+".join(sorted(set(names)))
    units = np.asarray([unit[s] for s in src.tolist()], dtype=object)
    if labels is not None:
        y = np.asarray(labels)
        for u in sorted(set(units.tolist())):
            rest = set(y[units != u].tolist())
            if len(rest) < 2:
                raise ValueError(f"leaving out {u} leaves its fold "
                                 f"{'no replies' if not rest else 'one class only'} to train on: "
                                 "hold fewer sources out together")
    return units


def out_of_fold_token_scores(sources: Sequence[str], labels: Sequence[int], x: Sequence[np.ndarray], *,
                             states: tuple[int, ...], width: int, min_tokens: int,
                             weights: np.ndarray | None = None,
                             together: Sequence[Sequence[str]] = ()) -> list[np.ndarray]:
    """Per reply, ``[T]`` window scores from the fit that left its source (or its group of
    ``together``) out (threshold 0)."""
    src = np.asarray(sources, dtype=object)
    y = np.asarray(labels).astype(int)
    units = held_out_units(sources, together, y)
    out: list[np.ndarray | None] = [None] * len(y)
    for held in sorted(set(units.tolist())):
        test, train = np.flatnonzero(units == held), np.flatnonzero(units != held)
        g = ReplyGuard(states=states, width=width, min_tokens=min_tokens)
        g.fit([x[i] for i in train], y[train], groups=src[train].tolist(),
              sample_weight=None if weights is None else weights[train])
        for i, s in zip(test, g.token_scores([x[i] for i in test])):
            out[i] = s
    return out  # type: ignore[return-value]


def _verdicts(token_scores: Sequence[np.ndarray], min_tokens: int) -> np.ndarray:
    return np.array([np.inf if not np.isfinite(c := s[scored_ends(len(s), min_tokens)]).all() else c.max()
                     for s in token_scores])


def threshold_for_safe_share(safe_scores: np.ndarray, share: float) -> float:
    """The lowest threshold (flag above it) that flags at most ``share`` of ``safe_scores``."""
    s = np.sort(np.asarray(safe_scores, dtype=np.float64))
    allowed = int(np.floor(share * len(s) + 1e-9))
    return float(s[len(s) - 1 - allowed]) if allowed < len(s) else float(s[0]) - 1.0


def report_at_threshold(token_scores: Sequence[np.ndarray], y: np.ndarray, kinds: Sequence[str],
                        sources: Sequence[str], threshold: float, min_tokens: int) -> dict[str, Any]:
    """What a reply guard does at ``threshold`` to replies whose token scores are ``token_scores``:
    harmful replies caught, safe ones flagged (replies to harmless prompts cut short, refusals),
    detection delay (reply tokens until the first counted window over the threshold), pooled
    AUROC/AUPRC with an interval, and flags per (source, class)."""
    v = _verdicts(token_scores, min_tokens)
    flagged = v > threshold
    first = []
    for s, lab in zip(token_scores, y):
        ends = scored_ends(len(s), min_tokens)
        hit = np.flatnonzero(~(s[ends] <= threshold))
        first.append(int(ends[hit[0]]) + 1 if len(hit) and lab else None)
    delays = [f for f in first if f is not None]
    kinds = np.asarray(kinds, dtype=object)
    src = np.asarray(sources, dtype=object)
    m = pooled_metrics(v[y == 1] - threshold, v[y == 0] - threshold, n_boot=300)
    per_source = []
    for name in sorted(set(src.tolist())):
        for lab in (1, 0):
            own = (src == name) & (y == lab)
            if own.any():
                per_source.append({"source": name, "class": "harmful" if lab else "safe", "n": int(own.sum()),
                                   "flagged": int(flagged[own].sum())})
    harmless = kinds == "harmless"
    return {
        "threshold": threshold,
        "harmful_flagged": int(flagged[y == 1].sum()), "harmful": int((y == 1).sum()),
        "safe_flagged": int(flagged[y == 0].sum()), "safe": int((y == 0).sum()),
        "harmless_cut_short": int(flagged[harmless].sum()), "harmless": int(harmless.sum()),
        "refusals_flagged": int(flagged[kinds == "refusal"].sum()), "refusals": int((kinds == "refusal").sum()),
        "median_delay": float(np.median(delays)) if delays else None,
        "p90_delay": float(np.percentile(delays, 90)) if delays else None,
        "auroc": m["auroc"] if m else None, "auprc": m["auprc"] if m else None,
        "auroc_ci": (m or {}).get("ci", {}).get("auroc"),
        "per_source": per_source,
    }


def fit_reply_guard(sources: Sequence[str], labels: Sequence[int], kinds: Sequence[str], x: Sequence[np.ndarray], *,
                    states: tuple[int, ...], width: int, min_tokens: int = 8, max_safe_flagged: float = 0.02,
                    balance: str = "kind", together: Sequence[Sequence[str]] = (), model: Any = None,
                    tokenizer: Any = None, formatter: Any = None) -> tuple[ReplyGuard, dict[str, Any]]:
    """The guard fitted on every reply, cut at the out-of-fold threshold (module docstring), and
    the out-of-fold report at that threshold. ``x``: per reply ``[T, S, d]`` states of ``states``;
    ``together``: groups of sources the out-of-fold fits leave out as one."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if not 0 <= max_safe_flagged < 1:
        raise ValueError(f"max_safe_flagged is a share in [0, 1), got {max_safe_flagged!r}")
    y = np.asarray(labels).astype(int)
    if len(set(sources)) < 2:
        raise ValueError("choosing a threshold on unseen sources needs replies from at least two prompt sources")
    w = kind_weights(kinds, y) if balance == "kind" else None
    oof = out_of_fold_token_scores(sources, y, x, states=states, width=width, min_tokens=min_tokens, weights=w,
                                   together=together)
    safe = _verdicts([s for s, lab in zip(oof, y) if not lab], min_tokens)
    threshold = threshold_for_safe_share(safe, max_safe_flagged)
    guard = ReplyGuard(model, tokenizer, states=states, width=width, min_tokens=min_tokens, threshold=threshold,
                       formatter=formatter)
    guard.fit(list(x), y, groups=list(sources), sample_weight=w)
    report = {"rule": f"threshold: the lowest that flags at most {max_safe_flagged:.1%} of the safe replies, "
                      "scored by fits that left their prompt source out"
                      + (" (grouped sources together)" if together else ""),
              "balance": balance, "max_safe_flagged": max_safe_flagged,
              **({"held_out_together": ["+".join(g) for g in together]} if together else {}),
              "out_of_fold": report_at_threshold(oof, y, kinds, sources, threshold, min_tokens),
              "training": {"sources": dict(sorted(Counter(sources).items())),
                           "kinds": dict(sorted(Counter(kinds).items()))}}
    guard.extra_ = report
    return guard, report
