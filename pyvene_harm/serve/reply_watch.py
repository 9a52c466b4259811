"""The reply guard riding on the decoding forward: each row of a ``generate`` call judged as it is written.

``generate`` runs one forward per new token: the first over the prompt, each later one over the
token just written (fed back with the cache). So the states of reply token ``k`` exist only after
the forward that wrote token ``k + 1``: when ``n`` tokens have been written, tokens ``0..n-2`` can
be judged. The text relay holds the newest token back by the same one step, so every token a client
sees was judged first, except the reply's very last one (no forward ever reads it: an end of turn,
which is not shown, or the last token of a reply cut at ``max_new_tokens``).

The hooks are a :class:`~pyvene_harm.guard.reply_states.StateTap` on the model's layers, the same
that reads replies for fitting, so streaming scores equal
:meth:`~pyvene_harm.guard.reply.ReplyGuard.token_scores` of the finished reply (tested).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..guard.reply_states import StateTap

__all__ = ["ReplyWatch", "stream_summary"]


def stream_summary(stream: Any, min_tokens: int) -> dict[str, Any]:
    """What a reply guard decided for one reply stream: ``flagged``, the token it stopped at, the
    highest counted window score (minus the threshold) and how many tokens it judged."""
    best = None if stream.n_tokens < min_tokens or stream.best == float("-inf") else float(stream.best)
    return {"flagged": stream.flagged_at is not None, "token": stream.flagged_at,
            "score": None if best is None else best - stream.threshold, "tokens_judged": stream.n_tokens}


class ReplyWatch:
    """One :class:`~pyvene_harm.guard.reply.ReplyStream` per batch row, fed from one state tap.

    Use as a context manager around the ``generate`` call; call :meth:`step` from the stopping
    criterion after each new token.
    """

    def __init__(self, reply_guard: Any, model: nn.Module, rows: int) -> None:
        self.guard = reply_guard
        self.tap = StateTap(model, reply_guard.states_)
        self.streams = [reply_guard.stream() for _ in range(rows)]

    def __enter__(self) -> ReplyWatch:
        self.tap.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tap.__exit__(*exc)

    def step(self, row: int, n_new: int) -> int | None:
        """Judge row ``row`` after its ``n_new``-th reply token was written; returns the index of
        the reply token that crossed the threshold (None: none yet)."""
        stream = self.streams[row]
        if n_new >= 2 and stream.flagged_at is None:
            last = self.tap.last
            if last is None:
                raise RuntimeError("the reply guard saw no decoding forward: the state hooks did not fire")
            stream.push(last[row, -1])
            if stream.n_tokens != n_new - 1:  # e.g. generate ran without its cache, re-reading every token
                raise RuntimeError(f"the reply guard holds {stream.n_tokens} tokens after {n_new} were written: "
                                   "decode with use_cache=True so each forward reads one new token")
        return stream.flagged_at

    def summary(self, row: int) -> dict[str, Any]:
        """What the reply guard decided for one row: ``flagged``, the token it stopped at, the
        highest counted window score and how many tokens it judged."""
        return stream_summary(self.streams[row], self.guard.min_tokens)
