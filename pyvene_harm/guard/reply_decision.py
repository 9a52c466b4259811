"""The rule that chooses a reply-guard design, applied to a ``guard reply-crossval`` run.

``docs/reply-guard-choice.md`` declares each run's rule before the run. Since its third run the
rule has two parts: a state design **passes** when, on every held-out (source, class) row of
``crossval.csv``, its AUROC is at least the text control's (``ngram``) minus a tolerance, and its
pooled AUROC is above the control's; the **choice** ranks designs by their worst row (ties: the
higher pooled AUROC). The third run chose first and checked the winner; the fourth checks first and
chooses among the designs that pass (``order``), since choosing first can pick a design that fails
while another passes. The fifth lets rows of refusals report without gating (``exempt``, from
``refusal_rows``): a flagged refusal is replaced by the refusal, so its errors reach no client.
Worked out by code so that an outcome's numbers are those of the run it names.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["ReplyStanding", "declared_reply_choice", "read_reply_crossval", "refusal_rows"]

Order = Literal["check-first", "choose-first"]


@dataclass
class ReplyStanding:
    """One design's figures under the rule and the rows where it falls behind the control by more
    than the tolerance (``behind``: ``"source/class: design vs control"``); ``behind_not_gating``
    lists the same for rows the rule reports without gating on (rows of refusals, fifth rule)."""

    design: str
    worst: float
    worst_row: str
    pooled: float
    behind: list[str] = field(default_factory=list)
    pooled_not_above: bool = False
    behind_not_gating: list[str] = field(default_factory=list)

    @property
    def passes(self) -> bool:
        return not self.behind and not self.pooled_not_above

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passes": self.passes}


def read_reply_crossval(run: str | Path) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """``(rows, pooled)`` of a finished ``guard reply-crossval`` run: each design's held-out AUROC per
    ``"source/class"`` row (``crossval.csv``) and its pooled AUROC (``results.json``)."""
    run = Path(run)
    rows: dict[str, dict[str, float]] = {}
    with open(run / "crossval.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if r["auroc"] not in ("", "nan"):
                rows.setdefault(r["design"], {})[f"{r['source']}/{r['class']}"] = float(r["auroc"])
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    pooled = {d: float(v["auroc"]) for d, v in results["pooled"].items() if v and v.get("auroc") is not None}
    return rows, pooled


def refusal_rows(run: str | Path) -> set[str]:
    """The ``"source/safe"`` rows of a ``guard reply-crossval`` run that hold only refusals.

    Read from the reply set the crossval read (``options.replies`` of its ``config.json``; its
    committed ``replies.csv``): a source's safe row is a row of refusals when every safe reply of that
    source has ``kind`` ``refusal``. A relative reply-set path is tried as given, then under each
    folder above the run (the run records it relative to where it was started)."""
    run = Path(run)
    replies = Path(json.loads((run / "config.json").read_text(encoding="utf-8"))["options"]["replies"])
    tried = [replies] if replies.is_absolute() else [replies, *(up / replies for up in run.resolve().parents)]
    found = next((p / "replies.csv" for p in tried if (p / "replies.csv").is_file()), None)
    if found is None:
        raise ValueError(f"the reply set {replies} this crossval read has no replies.csv here (tried "
                         f"{', '.join(str(p) for p in tried[:3])}...): run from the folder the crossval ran in")
    kinds: dict[str, set[str]] = {}
    with open(found, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if r["label"] == "0":
                kinds.setdefault(r["source"], set()).add(r["kind"])
    return {f"{source}/safe" for source, k in kinds.items() if k == {"refusal"}}


def declared_reply_choice(rows: dict[str, dict[str, float]], pooled: dict[str, float], candidates: Sequence[str],
                          *, control: str = "ngram", tolerance: float = 0.02, order: Order = "check-first",
                          exempt: Collection[str] = ()) -> tuple[str | None, list[ReplyStanding]]:
    """The winner among ``candidates`` (``None`` if none may ship) and every candidate's standing,
    best first.

    ``check-first`` (the fourth run's rule): the winner is the best-ranked candidate that passes.
    ``choose-first`` (the third run's): the best-ranked candidate wins if it passes, else nothing.
    ``exempt`` rows (the fifth rule: rows of refusals) are checked and reported but do not fail a
    candidate; the worst row that ranks candidates is still taken over every row.
    """
    if order not in ("check-first", "choose-first"):
        raise ValueError(f"order must be 'check-first' or 'choose-first', not {order!r}")
    missing = [d for d in (*candidates, control) if d not in rows or d not in pooled]
    if missing:
        raise ValueError(f"design(s) {', '.join(missing)} not in this run: it has {', '.join(sorted(rows))}")
    if not candidates:
        raise ValueError("no candidate design to choose from")
    ref = rows[control]
    unknown = sorted(set(exempt) - set(ref))
    if unknown:
        raise ValueError(f"row(s) {', '.join(unknown)} to exempt are not rows of this run")
    standings = []
    for d in candidates:
        mine = rows[d]
        if set(mine) != set(ref):
            raise ValueError(f"{d} and {control} were not scored on the same (source, class) rows: "
                             f"{sorted(set(mine) ^ set(ref))}")
        worst_row = min(mine, key=lambda k: (mine[k], k))
        behind = [k for k in sorted(mine) if mine[k] < ref[k] - tolerance - 1e-12]
        said = {k: f"{k}: {mine[k]:.3f} vs {ref[k]:.3f}" for k in behind}
        standings.append(ReplyStanding(design=d, worst=mine[worst_row], worst_row=worst_row, pooled=pooled[d],
                                       behind=[said[k] for k in behind if k not in exempt],
                                       pooled_not_above=not pooled[d] > pooled[control],
                                       behind_not_gating=[said[k] for k in behind if k in exempt]))
    standings.sort(key=lambda s: (-s.worst, -s.pooled))
    if order == "choose-first":
        return (standings[0].design if standings[0].passes else None), standings
    passing = [s for s in standings if s.passes]
    return (passing[0].design if passing else None), standings
