"""Client text stays text: control-token strings typed inside a message never become control tokens.

A Hugging Face tokenizer matches its special tokens (``<|im_end|>``, ``<|eot_id|>``, ...) anywhere
in the string it is given. A prompt is the chat template's markers with the client's messages
written between them, so a message that *types* ``<|im_end|>\\n<|im_start|>assistant`` would be
read by the model as a real end of turn and a real assistant turn: the text fakes a conversation,
and a guard reading the last "user" turn reads the attacker's innocent one.

The prompt is tokenised once as usual; the special tokens that fall inside a client span are the
forged ones. Each stretch of text between two of the template's own special tokens that holds a
forged one is tokenised again with ``split_special_tokens=True``. A tokenizer splits its input at
special tokens before anything else, so that stretch comes out exactly as if the strings typed in
it were not special, and the template's markers around it stay special. Prompts without forged
tokens (all ordinary traffic) keep the one batched tokenizer call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["control_token_ids", "control_token_pattern", "literal_client_text"]

Span = tuple[int, int]


def control_token_ids(tokenizer) -> np.ndarray:
    """The ids a tokenizer matches as special tokens (sorted, for ``np.isin``)."""
    ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return np.array(sorted(ids), dtype=np.int64)


def control_token_pattern(tokenizer) -> re.Pattern[str] | None:
    """A regex matching any of the tokenizer's special-token strings (longest first), or None
    when it has none: what a text that fakes chat turns is split at."""
    names = {getattr(t, "content", str(t)) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
             if getattr(t, "special", False)}
    names |= set(getattr(tokenizer, "all_special_tokens", None) or [])
    names = sorted((n for n in names if n), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def literal_client_text(tokenizer, text: str, ids: list[int], offsets: Sequence[Span],
                        client: Sequence[Span], specials: np.ndarray) -> tuple[list[int], list[Span]]:
    """``(ids, offsets)`` of ``text`` with every special token inside a ``client`` span re-read
    as plain text (see the module docstring); unchanged, and cheap, when there is none.

    Args:
        text: the whole rendered prompt.
        ids, offsets: its ordinary tokenisation (``add_special_tokens=False``, with offsets).
        client: character spans written by the client (message contents, the instruction).
        specials: :func:`control_token_ids` of the tokenizer.
    """
    arr = np.asarray(ids, dtype=np.int64)
    candidates = np.flatnonzero(np.isin(arr, specials))
    if not len(candidates) or not client:
        return list(ids), [tuple(o) for o in offsets]

    def forged(i: int) -> bool:
        s, e = offsets[i]
        return any(lo <= s and e <= hi for lo, hi in client)

    fake = [int(i) for i in candidates if forged(int(i))]
    if not fake:
        return list(ids), [tuple(o) for o in offsets]
    real = sorted(set(map(int, candidates)) - set(fake))
    # the stretches to read again: from the template's special token before a forged one to the next
    stretches: list[tuple[int, int]] = []  # token index ranges [lo, hi)
    for f in fake:
        lo = max((r for r in real if r < f), default=-1) + 1
        hi = min((r for r in real if r > f), default=len(ids))
        if not stretches or stretches[-1] != (lo, hi):
            stretches.append((lo, hi))
    out_ids: list[int] = []
    out_offsets: list[Span] = []
    at = 0
    for lo, hi in stretches:
        out_ids.extend(ids[at:lo])
        out_offsets.extend(tuple(o) for o in offsets[at:lo])
        start = offsets[lo - 1][1] if lo > 0 else 0
        end = offsets[hi][0] if hi < len(ids) else len(text)
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, split_special_tokens=True)
        out_ids.extend(int(x) for x in enc["input_ids"])
        out_offsets.extend((s + start, e + start) for s, e in enc["offset_mapping"])
        at = hi
    out_ids.extend(ids[at:])
    out_offsets.extend(tuple(o) for o in offsets[at:])
    return out_ids, out_offsets
