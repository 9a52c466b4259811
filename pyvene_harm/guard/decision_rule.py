"""The rule that chooses between guard designs, applied to a ``guard crossval`` run's results.

``docs/guard-choice.md`` declares each decision before its run: candidates are ranked by their
worst leave-one-source-out accuracy (ties: the higher mean), and a candidate is vetoed when, against
a reference design in the same run, its worst source, its accuracy pooled over the spelling
shifts or its mean on the other-language sources falls more than ``margin`` below the
reference's, or (for a read meant to resist appended text) its accuracy on the ``tail`` shift is
not above it; with ``per_source``, also when any one source (the shift sources included) falls
more than ``margin`` below the reference's on it (the ninth decision: a guard that replaces the
shipped one keeps every held-out figure of its card). Working the rule out from ``results.json`` by code, not by hand, keeps an
outcome's numbers those of the run it names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SPELLING_SHIFTS", "Standing", "declared_choice", "standing"]

SPELLING_SHIFTS = ("typos", "leet", "spacing", "homoglyph")
"""The shifts pooled as "spelling" (every edited prompt of the four, each scored by its fold)."""


@dataclass
class Standing:
    """One design's figures under the rule (accuracies as fractions) and, for a candidate, the
    vetoes it meets against the reference."""

    design: str
    worst: float
    worst_source: str
    mean: float
    spelling: float
    other_languages: float | None
    tail: float | None
    vetoes: list[str] = field(default_factory=list)
    by_source: dict[str, float] = field(default_factory=dict)
    """Accuracy on each source left out of fitting, and on each shift source."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def standing(results: dict[str, Any], design: str) -> Standing:
    """``design``'s worst and mean accuracy over the sources left out of fitting, its accuracy
    pooled over :data:`SPELLING_SHIFTS`, its mean on the shift sources (other languages) and its
    accuracy on the ``tail`` shift, from a ``guard crossval`` ``results.json``."""
    rows = [r for r in results["rows"] if r["design"] == design and not r.get("shift_source")]
    if not rows:
        known = sorted({r["design"] for r in results["rows"]})
        raise ValueError(f"design {design!r} is not in this run: it has {', '.join(known)}")
    worst = min(rows, key=lambda r: r["accuracy"])
    shifts = {s["shift"]: s for s in results.get("shifts", []) if s["design"] == design}
    spelled = [shifts[k] for k in SPELLING_SHIFTS if k in shifts]
    n = sum(s["n"] for s in spelled)
    shift_rows = [r for r in results["rows"] if r["design"] == design and r.get("shift_source")]
    return Standing(design=design, worst=worst["accuracy"], worst_source=worst["source"],
                    mean=sum(r["accuracy"] for r in rows) / len(rows),
                    spelling=sum(s["accuracy"] * s["n"] for s in spelled) / n if n else float("nan"),
                    other_languages=(sum(r["accuracy"] for r in shift_rows) / len(shift_rows)) if shift_rows else None,
                    tail=shifts["tail"]["accuracy"] if "tail" in shifts else None,
                    by_source={r["source"]: r["accuracy"] for r in rows + shift_rows})


def declared_choice(results: dict[str, Any], reference: str, candidates: Sequence[str], *,
                    margin: float = 0.02, tail_must_rise: bool = True,
                    per_source: bool = False) -> tuple[str | None, list[Standing]]:
    """The candidate the declared rule picks (None: every one vetoed) and every standing, the
    reference's first.

    Args:
        results: a ``guard crossval`` ``results.json``.
        reference: the design a candidate must not fall behind (the shipped one).
        candidates: the designs that may replace it.
        margin: how far (a fraction, 0.02 = 2 points) a candidate may fall below the reference
            on its worst source, the pooled spelling shifts and the other languages.
        tail_must_rise: veto a candidate whose ``tail`` shift accuracy is not above the reference's.
        per_source: veto a candidate that falls more than ``margin`` below the reference on any
            one source or shift source.
    """
    if not candidates:
        raise ValueError("give at least one candidate design")
    ref = standing(results, reference)
    out = [ref]
    for name in candidates:
        s = standing(results, name)
        if s.worst < ref.worst - margin:
            s.vetoes.append(f"worst source {s.worst:.1%} ({s.worst_source}) against {ref.worst:.1%}")
        if s.spelling < ref.spelling - margin:
            s.vetoes.append(f"spelling shifts {s.spelling:.1%} against {ref.spelling:.1%}")
        if s.other_languages is not None and ref.other_languages is not None and \
                s.other_languages < ref.other_languages - margin:
            s.vetoes.append(f"other languages {s.other_languages:.1%} against {ref.other_languages:.1%}")
        if tail_must_rise and (s.tail is None or ref.tail is None or s.tail <= ref.tail):
            s.vetoes.append(f"tail shift {s.tail if s.tail is None else f'{s.tail:.1%}'} not above "
                            f"{ref.tail if ref.tail is None else f'{ref.tail:.1%}'}")
        if per_source:
            for src, want in ref.by_source.items():
                acc = s.by_source.get(src, float("nan"))
                if not acc >= want - margin:  # a source the candidate was not scored on fails too
                    s.vetoes.append(f"source {src} {acc:.1%} against {want:.1%}")
        out.append(s)
    left = [s for s in out[1:] if not s.vetoes]
    winner = max(left, key=lambda s: (s.worst, s.mean)).design if left else None
    return winner, out
