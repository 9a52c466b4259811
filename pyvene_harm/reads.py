"""Where states are read along a prompt: the names of the reads and the token span of each.

A read is a single chat position (``t_inst``, ``t_post_inst``, ``post:K``) or the mean over a
span of tokens (``last:K``, ``scan:K``, ``mean_inst``, ``mean_post``). Collection, the guard's
designs and cross-validation all name reads this way; this module turns a name into the span
it averages, or into a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .positions import PromptBatch

__all__ = ["READS", "check_reads", "fixed_reads", "read_span", "scan_width", "sentence_width"]


READS = ("t_inst", "t_post_inst", "post:K", "last:K", "scan:K", "sent:K", "mean_inst", "mean_post")
"""What :func:`collect_states` can read, per state: one token, or the mean over a span of them.

``scan:K`` is the mean of the K-token window ending at *every* token of the instruction (see
:mod:`~pyvene_harm.windows`); as one row per prompt, as :func:`collect_states` returns it, it is
its last window, the same span as ``last:K``. ``sent:K`` reads the K-token window ending at every
sentence end of the instruction and at its last token (see :mod:`~pyvene_harm.sentences`); as one
row per prompt it too is ``last:K``."""


def _parse_read(name: str) -> tuple[str, int]:
    head, sep, k = str(name).partition(":")
    if not sep and head in ("t_inst", "t_post_inst", "mean_inst", "mean_post"):
        return head, 0
    if sep and head in ("post", "last", "scan", "sent") and k.isdigit() and (head == "post" or int(k) >= 1):
        return head, int(k)
    raise ValueError(f"unknown read {name!r}: use t_inst, t_post_inst, post:K, last:K, scan:K, sent:K (K >= 1), "
                     "mean_inst or mean_post")


def scan_width(name: str) -> int | None:
    """K of a ``scan:K`` read (the mean of every K-token window along the instruction), else None."""
    kind, k = _parse_read(name)
    return k if kind == "scan" else None


def sentence_width(name: str) -> int | None:
    """K of a ``sent:K`` read (the K-token windows ending at the instruction's sentence ends), else None."""
    kind, k = _parse_read(name)
    return k if kind == "sent" else None


def fixed_reads(names: Sequence[str]) -> list[str]:
    """``names`` with each ``scan:K`` and ``sent:K`` as ``last:K``: the one row per prompt that
    :func:`collect_states` returns for it (so all three share cached states)."""
    return [f"last:{_parse_read(n)[1]}" if _parse_read(n)[0] in ("scan", "sent") else n for n in names]


def check_reads(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, each a valid read (see :func:`read_span`), or a clear error."""
    if isinstance(names, str):
        names = [names]
    out = list(dict.fromkeys(names))
    if not out:
        raise ValueError("no reads given: name at least one, e.g. t_inst or mean_inst")
    for name in out:
        _parse_read(name)
    return out


def read_span(batch: PromptBatch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last token (``[b]`` each, inclusive) that the read ``name`` averages.

    ``t_inst``, ``t_post_inst`` and ``post:K`` (K tokens after t_inst) are single tokens;
    ``mean_inst`` is every token of the user message, ``last:K`` its last K tokens (fewer when
    it is shorter; ``scan:K``'s last window is the same span), ``mean_post`` the post-instruction tokens after t_inst (t_inst itself when
    the prompt has none). A mean over many tokens depends less on any one of them, the final
    punctuation mark above all, than the state at t_inst does.
    """
    kind, k = _parse_read(name)
    if kind in ("t_inst", "t_post_inst"):
        p = getattr(batch, kind)
        return p, p
    if kind == "post":
        p = torch.minimum(batch.t_inst + k, batch.t_post_inst)
        return p, p
    if kind in ("last", "scan", "sent"):
        return torch.maximum(batch.inst_start, batch.t_inst - k + 1), batch.t_inst
    if kind == "mean_inst":
        return batch.inst_start, batch.t_inst
    return torch.minimum(batch.t_inst + 1, batch.t_post_inst), batch.t_post_inst
