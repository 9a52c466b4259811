"""Replies with labels, made from prompt sets: what a reply guard is fitted and judged on.

A reply's label here is decided from the prompt's label and a keyword refusal judge (the paper's
English list, or ``keyword-multilingual`` for replies in other languages), never by reading the
reply:

* a harmful prompt answered (the judge finds no refusal) with the refusal direction removed is a
  **harmful** reply (``kind="ablated"``);
* a harmful prompt the plain model answered is a **harmful** reply too (``kind="accepted"``: a
  jailbreak template it went along with, or a request it does not refuse);
* a harmful prompt the plain model refused is a **safe** reply (``kind="refusal"``): a refusal
  harms no one, and the guard must not flag it for the request it quotes;
* any reply to a harmless prompt is **safe** (``kind="harmless"``), refusals included (an
  over-refusal is unhelpful, not harmful).

What such labels cannot tell: a "harmful" reply may be vague, wrong or a disguised refusal the
keyword list misses; a harmless prompt can still draw out something harmful. The run's README
holds a hand check of a sample.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["KINDS", "ReplyRow", "label_replies_of_set", "public_row", "reply_set_counts"]

KINDS = ("ablated", "accepted", "refusal", "harmless")

_HOW = {
    "ablated": "harmful prompt; refusal direction removed; {judge} judge: complied",
    "accepted": "harmful prompt; plain model; {judge} judge: complied",
    "refusal": "harmful prompt; plain model; {judge} judge: refused (a refusal is a safe reply)",
    "harmless": "harmless prompt; plain model (any reply, refusals included)",
}


@dataclass(frozen=True)
class ReplyRow:
    """One labelled reply: the prompt that drew it out, the reply, and how the label was decided."""

    source: str
    """The prompt set the prompt came from (the unit held out in cross-validation)."""
    prompt: str
    reply: str
    label: int
    """1 harmful reply, 0 safe reply."""
    kind: str
    """One of :data:`KINDS`."""
    how: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_replies_of_set(source: str, prompt_label: int, prompts: Sequence[str], plain: Sequence[str],
                         plain_refused: Sequence[bool], ablated: Sequence[str] | None = None,
                         ablated_refused: Sequence[bool] | None = None, *,
                         judge: str = "keyword") -> list[ReplyRow]:
    """The labelled rows one prompt set gives (see the module docstring); ablated replies that
    the judge finds refused are dropped (they are neither a harmful reply nor the model's own
    refusal). ``judge`` names the refusal judge that gave the verdicts, for each row's ``how``."""
    how = {kind: text.format(judge=judge) for kind, text in _HOW.items()}
    if not (len(prompts) == len(plain) == len(plain_refused)):
        raise ValueError("one plain reply and one refusal verdict per prompt are needed")
    if prompt_label not in (0, 1):
        raise ValueError(f"a prompt label is 1 (harmful) or 0 (harmless), got {prompt_label!r}")
    rows: list[ReplyRow] = []
    for p, r, refused in zip(prompts, plain, plain_refused):
        kind = "harmless" if not prompt_label else ("refusal" if refused else "accepted")
        rows.append(ReplyRow(source, p, r, int(prompt_label and not refused), kind, how[kind]))
    if ablated is not None and prompt_label:
        if ablated_refused is None or not (len(ablated) == len(ablated_refused) == len(prompts)):
            raise ValueError("one ablated reply and one refusal verdict per prompt are needed")
        rows.extend(ReplyRow(source, p, r, 1, "ablated", how["ablated"])
                    for p, r, refused in zip(prompts, ablated, ablated_refused) if not refused)
    return rows


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def public_row(row: ReplyRow, *, words: int = 5) -> dict[str, Any]:
    """What may be committed of a row: labels, hashes and the reply's first few words (a harmful
    reply's full text stays in the run's ``units/``, which the run regenerates)."""
    head = " ".join(row.reply.split()[:words])
    return {"source": row.source, "kind": row.kind, "label": row.label, "how": row.how,
            "prompt_sha": _sha(row.prompt), "reply_sha": _sha(row.reply), "reply_start": head,
            "reply_chars": len(row.reply)}


def reply_set_counts(rows: Iterable[ReplyRow]) -> list[dict[str, Any]]:
    """Rows per (source, kind, label), in a stable order."""
    c = Counter((r.source, r.kind, r.label) for r in rows)
    return [{"source": s, "kind": k, "label": lab, "n": n} for (s, k, lab), n in sorted(c.items())]
