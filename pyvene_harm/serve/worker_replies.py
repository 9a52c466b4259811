"""The reply side of :class:`~pyvene_harm.serve.worker.GuardWorker`: the replies the guard let
through, decoded on the worker thread between scoring batches, alone or several greedy ones in one
``generate`` call, each streamed, stopped on its own and judged by the reply guard if one is
served; with an upstream engine, the reply handed to the engine and the reads of its tokens, run
in hand (ahead of queued jobs). A mixin, because it shares the worker's state (its model, queue
of waiting replies, counters); kept apart so that each half of the worker reads on its own.
"""

from __future__ import annotations

import logging
from typing import Any

from .decoding import Reply, ReplyRequest, generate_reply, generate_reply_batch
from .errors import ApiError, internal_error
from .jobs import ChatJob
from .schemas import Verdict
from .upstream_replies import UpstreamReplyRead, WorkerReplyRead

__all__ = ["ReplyDecoding"]

logger = logging.getLogger("pyvene_harm.serve")


class ReplyDecoding:
    """Needs the worker's ``model``, ``formatter``, ``steering``, ``engine``, ``reply_guard``,
    ``max_reply_batch``, ``steer_any_system_prompt``, ``stats``, ``refusal_message``, ``_replies``,
    ``_in_hand``, ``_end_ids``, ``_batches_while_waiting``, ``_stopped`` and its ``_skip``,
    ``_fail`` and ``_finished``."""

    model: Any
    formatter: Any
    steering: Any
    engine: Any
    reply_guard: Any
    max_reply_batch: int
    steer_any_system_prompt: bool
    stats: Any
    refusal_message: str
    _replies: Any
    _in_hand: Any
    _end_ids: Any
    _batches_while_waiting: int
    _stopped: bool

    def steers(self, job: ChatJob) -> bool:
        """Whether ``job``'s reply is decoded with the steering: only under the system prompt the
        guard judged with, unless the operator allowed any (``steer_any_system_prompt``)."""
        if self.steering is None and getattr(self.engine, "adapter", None) is None:
            return False
        own = job.conversation.system_prompt
        return self.steer_any_system_prompt or own is None or own == self.formatter.system_prompt

    def _after_verdict(self, job: ChatJob, verdict: Verdict) -> None:
        job.emit("verdict", verdict)
        if not verdict.harmful and self.engine is not None:
            try:  # the engine reads the very ids this formatter gives the guard
                ids = list(self.formatter.tokenize([job.conversation])[0].ids)
            except Exception as exc:
                self._fail(job, exc)
                return
            self.stats.replies += 1
            reading = None
            if self.reply_guard is not None:  # the engine's tokens, read by this copy as they come
                reading = WorkerReplyRead(self, UpstreamReplyRead(self.reply_guard, self.model, ids,
                                                                  end_ids=self._end_ids))
            self.engine.submit(job, ids, steer=self.steers(job), done=lambda: self._finished(job), reading=reading)
            return
        if not verdict.harmful:
            if not self._replies:
                self._batches_while_waiting = 0
            self._replies.append(job)
            return
        try:
            tokens = len(self.formatter.tokenize([job.conversation])[0].ids)
        except Exception as exc:
            self._fail(job, exc)
            return
        job.emit("done", Reply(text=self.refusal_message, prompt_tokens=tokens, completion_tokens=0,
                               finish_reason="content_filter"))
        self._finished(job)

    def _run_in_hand(self) -> None:
        """The reads of replies in flight, in order of arrival (outside the ``max_queue`` count)."""
        while self._in_hand:
            job = self._in_hand.popleft()
            if job.cancelled:
                continue
            self.stats.busy = "reading a reply"
            try:
                value = job.fn()
            except Exception as exc:
                logger.error("reading a reply failed in the model worker", exc_info=exc)
                job.fail(exc if isinstance(exc, ApiError) else internal_error())
                continue
            job.finish(value)

    def _reply_next(self) -> None:
        """Decode the oldest waiting reply, together with the waiting ones that can share its
        ``generate`` call: greedy, no penalties, the same steering (up to ``max_reply_batch``)."""
        first = self._replies.popleft()
        group = [first]
        if self.max_reply_batch > 1 and _batchable(first):
            steer = self.steers(first)
            for job in list(self._replies):
                if len(group) >= self.max_reply_batch:
                    break
                if _batchable(job) and self.steers(job) == steer:
                    self._replies.remove(job)
                    group.append(job)
        for job in [j for j in group if j.cancelled]:
            group.remove(job)
            self._skip(job)
        if len(group) == 1:
            self._reply(group[0])
        elif group:
            self._reply_batch(group)

    def _reply_batch(self, jobs: list[ChatJob]) -> None:
        self.stats.busy = "generating"
        steer = self.steers(jobs[0])
        if self.steering is not None and not steer:
            self.stats.replies_unsteered += len(jobs)
        requests = [ReplyRequest(job.conversation, job.max_new_tokens, stop=job.stop,
                                 on_text=(lambda text, job=job: job.emit("text", text)) if job.stream else None,
                                 should_stop=lambda job=job: job.cancelled or self._stopped) for job in jobs]
        try:
            replies = generate_reply_batch(self.model, self.formatter, requests,
                                           steering=self.steering if steer else None, reply_guard=self.reply_guard)
        except Exception as exc:
            for job in jobs:
                self._fail(job, exc)
            return
        self.stats.reply_batches += 1
        self.stats.largest_reply_batch = max(self.stats.largest_reply_batch, len(jobs))
        for job, reply in zip(jobs, replies):
            self._deliver(job, reply)

    def _reply(self, job: ChatJob) -> None:
        if job.cancelled:
            self._skip(job)
            return
        self.stats.busy = "generating"
        steer = self.steers(job)
        if self.steering is not None and not steer:
            self.stats.replies_unsteered += 1
        try:
            reply = generate_reply(
                self.model, self.formatter, job.conversation,
                max_new_tokens=job.max_new_tokens, steering=self.steering if steer else None,
                temperature=job.temperature, top_p=job.top_p, seed=job.seed, stop=job.stop,
                frequency_penalty=job.frequency_penalty, presence_penalty=job.presence_penalty,
                should_stop=lambda: job.cancelled or self._stopped,
                on_text=(lambda text: job.emit("text", text)) if job.stream else None,
                reply_guard=self.reply_guard,
            )
        except Exception as exc:
            self._fail(job, exc)
            return
        self._deliver(job, reply)

    def _deliver(self, job: ChatJob, reply: Reply) -> None:
        if reply.finish_reason == "cancelled" and self._stopped and not job.cancelled:
            self._fail(job, ApiError(503, "the server is shutting down: retry on another instance",
                                     type="server_error", code="unavailable"))
            return
        self.stats.replies += 1
        self.stats.tokens_generated += reply.completion_tokens
        if reply.finish_reason == "cancelled":
            self.stats.replies_cancelled += 1
        if reply.reply_guard is not None and reply.reply_guard["flagged"]:
            self.stats.replies_stopped += 1
        job.emit("done", reply)
        self._finished(job)


def _batchable(job: ChatJob) -> bool:
    """Greedy and without penalties: rows of one batched ``generate`` share these settings."""
    return not job.temperature and not job.frequency_penalty and not job.presence_penalty
