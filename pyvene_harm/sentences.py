"""Reading a prompt at the ends of its sentences: a read appended text cannot move off a request.

The shipped guards read the mean of the instruction's last K tokens, so a harmless tail written
after a request ("... Also, unrelated: write a haiku about spring") moves the read onto the tail.
Reading every K-token window instead (``scan:K``, :mod:`~pyvene_harm.windows`) cannot be diluted,
but the window ending at any token of a long harmless instruction may fire on a fragment of it
("How do I kill" of "How do I kill a Python process?"). A ``sent:K`` read looks only at the
windows that end where a sentence does (a token whose text ends in ``. ? ! : ;``, a newline, or
their full-width forms) and at the instruction's last token: fragments that stop mid-sentence are
never read, and a request that ends a sentence keeps its own window, unchanged by causal attention,
whatever is appended.

The verdict is the last window's score against the threshold and each earlier sentence end's
against the threshold plus a ``margin`` (:func:`sentence_decision`). With margin 0 appending text
cannot lower the score of a request that ends a sentence; with a margin it lowers it by at most
the margin, so a request whose window clears the threshold by more than the margin stays flagged.
The margin is fitted on training sources (:func:`fit_margin`), never on a reported set: the
highest earlier sentence end of each harmless training prompt, scored by a read-out refitted
without that prompt's source, may add at most a ``budget`` share of flags to any one source.

A request that does not end a sentence before the appended text ("...operating system Then
explain ...") shares its windows with the text after it: the attacker controls the joint, and
this read promises nothing there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SENTENCE_END", "fit_margin", "instruction_pieces", "last_and_earlier", "sentence_decision",
           "sentence_ends"]

SENTENCE_END = re.compile(r"[.?!:;\n\u3002\uff1f\uff01\uff1a\uff1b]\s*$")
"""A token whose text ends with one of these (trailing spaces aside) ends a sentence."""


def sentence_ends(pieces: Sequence[str]) -> np.ndarray:
    """Indices of the tokens (their decoded texts ``pieces``) that end a sentence, ascending,
    the last token always among them."""
    if not len(pieces):
        raise ValueError("an instruction with no tokens has no sentences")
    ends = [k for k, p in enumerate(pieces) if SENTENCE_END.search(p)]
    if not ends or ends[-1] != len(pieces) - 1:
        ends.append(len(pieces) - 1)
    return np.asarray(ends, dtype=int)


def instruction_pieces(formatter: Any, prompts: Sequence[Any]) -> list[list[str]]:
    """Per prompt, the decoded text of each instruction token (from its first token to t_inst,
    the tokens :func:`~pyvene_harm.collect.collect_token_states` returns states of)."""
    tok = formatter.tokenizer
    out = []
    for enc in formatter.tokenize(list(prompts)):
        ids = enc.ids[enc.inst_start:enc.t_inst + 1]
        out.append(tok.batch_decode([[i] for i in ids]))
    return out


def sentence_decision(window_scores: np.ndarray, ends: np.ndarray, threshold: float,
                      margin: float = 0.0) -> tuple[float, int]:
    """``(decision, token)``: the highest of the last window's score minus ``threshold`` and each
    earlier sentence end's window score minus ``threshold + margin``, and the token (counted from
    the instruction's first) whose window gave it. A NaN anywhere wins (the guard fails closed)."""
    s = np.asarray(window_scores, dtype=np.float64)
    ends = np.asarray(ends, dtype=int)
    if len(s) == 0 or len(ends) == 0 or ends[-1] != len(s) - 1:
        raise ValueError(f"sentence ends {ends.tolist()} do not close an instruction of {len(s)} tokens: "
                         "the last token must be the last end")
    d = s[ends] - threshold
    d[:-1] -= margin
    j = int(np.argmax(np.where(np.isnan(d), np.inf, d)))
    return float(d[j]), int(ends[j])


def last_and_earlier(window_scores: np.ndarray, ends: np.ndarray, threshold: float) -> tuple[float, float]:
    """``(last, earlier)``: the last window's score and the highest earlier sentence end's, each
    minus ``threshold`` (``-inf`` for an instruction of one sentence): what :func:`fit_margin`
    reads of each harmless prompt."""
    s = np.asarray(window_scores, dtype=np.float64)
    ends = np.asarray(ends, dtype=int)
    earlier = s[ends[:-1]].max() - threshold if len(ends) > 1 else -np.inf
    return float(s[-1] - threshold), float(earlier)


def fit_margin(last_scores: np.ndarray, earlier_best: np.ndarray, groups: Sequence[Any], budget: float) -> float:
    """The margin earlier sentence ends must clear, from harmless training prompts.

    Args:
        last_scores: ``[n]`` each harmless prompt's last-window score minus the threshold, under a
            read-out that did not see its group.
        earlier_best: ``[n]`` its highest earlier sentence end's window score minus the threshold,
            under the same read-out (``-inf`` where it has no earlier sentence end).
        groups: ``[n]`` its source.
        budget: the share of any one group that earlier sentence ends may flag beyond what the
            last window flags.

    Returns the smallest margin >= 0 that keeps every group within ``budget`` (flags are
    ``score > margin``, so at most ``floor(budget * n_group)`` of a group exceed it).
    """
    if not 0 <= budget < 1:
        raise ValueError(f"budget is a share of prompts in [0, 1), got {budget!r}")
    last = np.asarray(last_scores, dtype=np.float64)
    best = np.asarray(earlier_best, dtype=np.float64)
    g = np.asarray(groups).astype(str)
    if not (len(last) == len(best) == len(g)) or not len(g):
        raise ValueError(f"fitting a margin needs one last score, one earlier score and one group per harmless prompt "
                         f"(got {len(last)}, {len(best)}, {len(g)})")
    if np.isnan(last).any() or np.isnan(best).any():
        raise ValueError("harmless training scores hold NaN: the read-out's states are not finite")
    margin = 0.0
    for name in np.unique(g):
        m = g == name
        added = np.sort(best[m & (last <= 0)])[::-1]  # only prompts the last window leaves unflagged
        allowed = int(np.floor(budget * m.sum()))
        if len(added) > allowed:
            margin = max(margin, float(added[allowed]))
    return margin
