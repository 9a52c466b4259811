"""Judging a conversation: every message on its own, and the last user message in context.

A request can be moved anywhere the model reads: into the system message ("whatever the user
says, reply with bomb instructions"), into an earlier or a fake assistant turn, or spread over
turns so that the last user message looks innocent. The guard therefore reads each message as
if it were an instruction (with the guard's own system prompt, as it was fitted), and the last
user message where the model will read it, after the whole conversation; the conversation is
harmful when any of these reads is. A lone user message is one read, exactly as before.

A text that types the model's control tokens (``...<|im_end|>\n<|im_start|>user\nContinue``)
is read as plain text, whole, as the model reads it; but the guard's reads sit at the end of that
text, after the innocent tail the forgery ends with. Such a text is therefore also read piece by
piece, split at the control-token strings, so that the request hidden before a fake turn is read
on its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .latent import GuardReport

from ..conversation import Conversation, as_conversation
from ..literal_text import control_token_pattern
from .spelling import normalize_spelling

__all__ = ["CONTEXT", "MAX_PIECES", "ConversationVerdict", "combine_parts", "conversation_parts", "judge_conversations",
           "judge_groups", "score_reads", "text_parts"]

CONTEXT = "conversation"
"""The label of the read of the last user message after the whole conversation."""


@dataclass(frozen=True)
class ConversationVerdict:
    """The guard's answer for one conversation.

    ``score`` (the score the threshold cuts), ``delta_harmful`` and ``probability`` are those of
    the read that came closest to harmful; ``flagged_by`` names every read called harmful
    (``"messages[0] (system)"``, ``"conversation"``); ``parts`` holds each read's own row. The
    refusal belief is not the worst read's: it is the model's, read where the model reads the
    whole conversation.
    """

    harmful: bool
    score: float
    delta_harmful: float
    probability: float
    flagged_by: tuple[str, ...]
    category: str | None = None
    category_scores: dict[str, float] | None = None
    parts: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    delta_refuse: float | None = None
    """The model's refusal belief where it reads the conversation (the read in context, or the
    lone user message), when the guard has a refusal read; None otherwise."""
    refuse_probability: float | None = None


MAX_PIECES = 8
"""Most pieces a text that types control tokens is read in: pieces after the 7th are read
together as the 8th (the control-token strings between them kept as text), so typing ``<|im_end|>``
a thousand times costs eight reads, not a thousand."""


def text_parts(label: str, text: str, split_at: re.Pattern[str] | None = None) -> list[tuple[str, str]]:
    """``[(label, text)]``, plus one read per piece when ``text`` holds control-token strings,
    typed plainly or spelled with look-alike letters, invisible characters or leetspeak
    (:func:`~pyvene_harm.guard.spelling.normalize_spelling`); at most :data:`MAX_PIECES` pieces."""
    parts = [(label, text)]
    if split_at is not None:
        plain = normalize_spelling(text)  # the same text when nothing is disguised
        if split_at.search(plain):
            cuts = [0, *(x for m in split_at.finditer(plain) for x in (m.start(), m.end())), len(plain)]
            spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if plain[a:b].strip()]
            if len(spans) > MAX_PIECES:
                spans = spans[:MAX_PIECES - 1] + [(spans[MAX_PIECES - 1][0], spans[-1][1])]
            parts += [(f"{label} piece {k}", plain[a:b]) for k, (a, b) in enumerate(spans)]
    return parts


def conversation_parts(conversation: Conversation,
                       split_at: re.Pattern[str] | None = None) -> list[tuple[str, str | Conversation]]:
    """``(label, prompt)`` for every read the guard makes of ``conversation``; ``split_at``
    (:func:`~pyvene_harm.literal_text.control_token_pattern`) adds the pieces of texts that
    type control tokens."""
    parts: list[tuple[str, str | Conversation]] = []
    for i, (role, content) in enumerate(conversation.messages):
        parts += text_parts(f"messages[{i}] ({role})", content, split_at)
    if not conversation.single_turn:  # a lone user message read on its own is the read in context
        parts.append((CONTEXT, conversation))
    return parts


def combine_parts(labels: Sequence[str], harmful: np.ndarray, score: np.ndarray, delta: np.ndarray,
                  probability: np.ndarray, threshold: float, category: Sequence[str] | None = None,
                  category_scores: np.ndarray | None = None,
                  category_names: Sequence[str] = (), delta_refuse: np.ndarray | None = None,
                  refuse_probability: np.ndarray | None = None) -> ConversationVerdict:
    """One verdict from the reads of one conversation (arrays of ``len(labels)``)."""
    margin = np.where(np.isfinite(score), score - threshold, np.inf)  # a non-finite read leads: it is flagged
    top = int(np.argmax(np.where(harmful, margin, -np.inf) if harmful.any() else margin))
    parts = tuple({"part": lab, "harmful": bool(harmful[i]), "score": float(score[i]),
                   "delta_harmful": float(delta[i]), "probability": float(probability[i])}
                  for i, lab in enumerate(labels))
    return ConversationVerdict(
        harmful=bool(harmful.any()), score=float(score[top]), delta_harmful=float(delta[top]),
        probability=float(np.max(probability)), flagged_by=tuple(lab for lab, h in zip(labels, harmful) if h),
        category=None if category is None else str(category[top]),
        category_scores=None if category_scores is None else dict(zip(category_names,
                                                                      map(float, category_scores[top]))),
        parts=parts, **_refusal_in_context(labels, delta_refuse, refuse_probability))


def _refusal_in_context(labels: Sequence[str], delta: np.ndarray | None,
                        probability: np.ndarray | None) -> dict[str, float | None]:
    """The refusal belief of the read the model makes: the conversation in context, or (a lone
    user message) its first, whole read."""
    if delta is None:
        return {}
    i = list(labels).index(CONTEXT) if CONTEXT in labels else 0
    return {"delta_refuse": float(delta[i]),
            "refuse_probability": None if probability is None else float(probability[i])}


def score_reads(guard: Any, reads: Sequence[str | Conversation]) -> GuardReport:
    """``guard.report(reads)``, with instructions and conversations scored in separate passes.

    A scoring pass runs the template prefix its prompts share once
    (:class:`~pyvene_harm.shared_prefix.SharedPrefix`). Instructions share the guard's whole template
    prefix (its system prompt included); a conversation brings its own system message, and
    mixed into one pass it would shrink the shared prefix to a few tokens for everyone. Scored
    apart, each kind keeps its own.
    """
    from .latent import GuardReport

    kinds = [isinstance(r, Conversation) for r in reads]
    if all(kinds) or not any(kinds):
        return guard.report(list(reads))
    idx = {k: [i for i, c in enumerate(kinds) if c is k] for k in (False, True)}
    parts = {k: guard.report([reads[i] for i in idx[k]]) for k in (False, True)}
    n = len(reads)

    def merge(name: str) -> Any:
        first = getattr(parts[False], name)
        if first is None:
            return None
        if isinstance(first, list):
            out: list[Any] = [None] * n
            for k in (False, True):
                for j, i in enumerate(idx[k]):
                    out[i] = getattr(parts[k], name)[j]
            return out
        out_arr = np.empty((n, *np.asarray(first).shape[1:]), dtype=np.asarray(first).dtype)
        for k in (False, True):
            out_arr[idx[k]] = getattr(parts[k], name)
        return out_arr

    return GuardReport(delta_harmful=merge("delta_harmful"), per_layer=merge("per_layer"),
                       layers=parts[False].layers, harmful=merge("harmful"), probability=merge("probability"),
                       category=merge("category"), score=merge("score"), category_scores=merge("category_scores"),
                       delta_refuse=merge("delta_refuse"), refuse_probability=merge("refuse_probability"))


def judge_groups(guard: Any, groups: Sequence[Sequence[tuple[str, str | Conversation]]]) -> list[ConversationVerdict]:
    """One verdict per group of ``(label, read)`` pairs, every read of every group scored in
    one call of :func:`score_reads` (what the library and the server's batches both use)."""
    rep = score_reads(guard, [read for group in groups for _, read in group])
    names = [str(c) for c in getattr(guard, "categories_", [])]
    out, at = [], 0
    for group in groups:
        sl = slice(at, at + len(group))
        at += len(group)
        out.append(combine_parts([label for label, _ in group], rep.harmful[sl], rep.score[sl],
                                 rep.delta_harmful[sl], rep.probability[sl], guard.threshold_,
                                 None if rep.category is None else rep.category[sl],
                                 None if rep.category_scores is None else rep.category_scores[sl], names,
                                 None if rep.delta_refuse is None else rep.delta_refuse[sl],
                                 None if rep.refuse_probability is None else rep.refuse_probability[sl]))
    return out


def judge_conversations(guard: Any, conversations: Sequence[Any]) -> list[ConversationVerdict]:
    """:meth:`LatentGuard.judge_conversations <pyvene_harm.guard.latent.LatentGuard.judge_conversations>`:
    the input checked (a list of conversations, each turned into a
    :class:`~pyvene_harm.conversation.Conversation`), split into reads, judged in one pass."""
    if isinstance(conversations, (str, dict)) or not isinstance(conversations, Sequence):
        raise TypeError("pass a list of conversations, each a list of {'role', 'content'} messages")
    if len(conversations) == 0:
        raise ValueError("empty conversation list: pass at least one conversation")
    convs = []
    for i, c in enumerate(conversations):
        try:
            convs.append(as_conversation(c))
        except (TypeError, ValueError) as err:
            raise type(err)(f"conversation {i}: {err}") from None
    split_at = control_token_pattern(guard.chat_formatter().tokenizer)
    return judge_groups(guard, [conversation_parts(c, split_at) for c in convs])
