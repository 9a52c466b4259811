"""The reply guard in front of an upstream engine: the engine's reply tokens read by the guard's copy.

With ``--upstream`` the engine (vLLM) decodes, and the states it computes never reach this process.
So the guard's own copy of the model (the same weights, checked at start to tokenise alike) reads
the reply as the engine writes it: the prompt once, then each streamed piece's tokens with the
copy's cache, the reply guard's states tapped from that forward (the same
:class:`~pyvene_harm.guard.reply_states.StateTap` the in-process decoder and the fit read through)
and pushed into a :class:`~pyvene_harm.guard.reply.ReplyStream`. The engine is asked for the ids of
the tokens it wrote (vLLM's ``return_token_ids``), so the guard reads exactly those tokens, never a
re-tokenisation of their text; an engine that does not send them is an error, not a reply relayed
unread.

A piece of text is relayed only after its tokens were read, so the engine must send each piece's
ids with it (text that vLLM holds back for a stop string comes later than its ids, never before).
A reply's last token is read too, unless it is the end of turn that ended the reply: in-process
decoding never reads that one (no forward takes it), and neither does this, so both judge the same
tokens. A flagged reply ends before the piece that crossed the threshold: the engine's stream is
closed (vLLM aborts the request) and the client gets ``finish_reason: "content_filter"``, as
in-process.

The cost is a second forward of the copy, on the worker's thread (the one thread that runs the
model), the prompt once and then each reply's new tokens with its cache (the pieces that arrived
during a read together). Decoding stays the engine's; the reads of every reply a guard server
fronts share its one thread (``benchmarks/bench_upstream_reply_guard.py`` measures what that
costs). A reply's cache is dropped as soon as the reply is flagged or finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..cache_compat import cache_argument, output_cache
from ..decoder_depth import decoder_of
from ..guard.reply_states import StateTap
from .reply_watch import stream_summary

__all__ = ["UpstreamReplyRead", "WorkerReplyRead", "end_of_turn_ids"]


def end_of_turn_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a reply, as in-process decoding stops on them (the model's generation
    config's ``eos_token_id``, else the tokenizer's)."""
    from ..generation import greedy_config

    eos = greedy_config(model, tokenizer, 1).eos_token_id
    return [] if eos is None else [int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos])]


class UpstreamReplyRead:
    """One engine reply read by the guard's copy of the model, piece by piece.

    Args:
        reply_guard: a fitted ``ReplyGuard`` for ``model``.
        model: the guard's copy (a scoring copy cut to the layers it reads is enough: the reply
            guard's states must be among them).
        prompt_ids: the ids the engine was sent (what the guard judged).
        end_ids: the model's end-of-turn ids: one that ends a reply is not read
            (:meth:`end_of_reply`), as in-process decoding never reads it.

    :meth:`read` runs the model, so call it on the worker's thread.
    """

    def __init__(self, reply_guard: Any, model: Any, prompt_ids: Sequence[int], *,
                 end_ids: Sequence[int] = ()) -> None:
        self.guard, self.model = reply_guard, model
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.end_ids = frozenset(int(t) for t in end_ids)
        self.stream = reply_guard.stream()
        self.cache: Any = None
        self.read_ids: list[int] = []

    def end_of_reply(self, ids: Sequence[int]) -> list[int]:
        """The last piece's ids without the end of turn that ended the reply."""
        ids = list(ids)
        return ids[:-1] if ids and ids[-1] in self.end_ids else ids

    def close(self) -> None:
        """Drop the cache (the reply is flagged or finished): it holds every layer's keys and values."""
        self.cache = None

    @torch.no_grad()
    def read(self, ids: Sequence[int]) -> int | None:
        """Read the reply's next tokens ``ids``; returns the index (from the reply's first token)
        of the token that crossed the threshold, None while none has. Tokens after a flagged one
        are not read."""
        ids = [int(t) for t in ids]
        if not ids or self.stream.flagged_at is not None:
            return self.stream.flagged_at
        if self.cache is None and self.read_ids:
            raise RuntimeError("this reply's read was closed: a reply is read once")
        fed = self.prompt_ids + ids if self.cache is None else ids
        decoder = decoder_of(self.model)
        inputs: dict[str, Any] = {"input_ids": torch.tensor([fed], device=next(self.model.parameters()).device),
                                  "use_cache": True}
        if self.cache is not None:
            inputs[cache_argument(decoder)] = self.cache
        with StateTap(self.model, self.guard.states_) as tap:
            out = decoder(**inputs)
        if tap.last is None:
            raise RuntimeError("the reply guard saw no forward of the guard's copy: the state hooks did not fire")
        self.cache = output_cache(out)
        states = tap.last[0, -len(ids):]
        for k in range(len(ids)):
            self.stream.push(states[k])
            self.read_ids.append(ids[k])
            if self.stream.flagged_at is not None:
                self.close()
                break
        return self.stream.flagged_at

    def summary(self) -> dict[str, Any]:
        """The reply guard's finding, in the shape in-process decoding gives (``flagged``,
        ``token``, ``score``, ``tokens_judged``)."""
        return stream_summary(self.stream, self.guard.min_tokens)


class WorkerReplyRead:
    """An :class:`UpstreamReplyRead` whose reads run on the worker's thread, awaited from the relay.

    A read belongs to a reply already in hand, so the worker runs it in hand: ahead of queued
    jobs, without waiting for a batch to fill, and outside ``--max-queue`` (its request is counted
    there already)."""

    def __init__(self, worker: Any, read: UpstreamReplyRead) -> None:
        self.worker, self.read = worker, read
        self.stopped = False

    async def judge(self, ids: Sequence[int]) -> int | None:
        import asyncio

        from .jobs import CallJob

        ids = list(ids)
        call = CallJob(asyncio.get_running_loop(), lambda: self.read.read(ids))
        self.worker.submit(call, in_hand=True)
        try:
            flagged = await call.future
        finally:
            call.cancel()  # a no-op once answered; dropped by the worker if the relay was cancelled
        if flagged is not None and not self.stopped:
            self.stopped = True
            self.worker.stats.replies_stopped += 1
        return flagged

    @property
    def tokens_read(self) -> int:
        return len(self.read.read_ids)

    def end_of_reply(self, ids: Sequence[int]) -> list[int]:
        return self.read.end_of_reply(ids)

    def close(self) -> None:
        self.read.close()

    def summary(self) -> dict[str, Any]:
        return self.read.summary()
