"""The one thread that runs the model: guard scoring in bounded batches, then replies in batches.

Requests arrive on the event loop and become jobs on a queue; each job is a list of reads (every
input, message and piece the guard judges). The worker takes the first job, keeps taking jobs
until they hold ``max_batch`` reads, ``max_wait_ms`` have passed since the first, or (with
``max_gap_ms``) no job has come for that long, and scores one batch: at most ``max_batch`` reads
and ``max_batch_tokens`` tokens, in one ``guard.report`` call (which splits it into forward passes
of ``guard.batch_size``). A job too large for one batch is scored over several, and jobs that have
had fewer batches go first, so a request that arrives while a large one is being scored waits for
one batch, not for all of it; a job whose client left or whose time ran out is dropped between
batches, so its remaining reads cost nothing. A job is answered once all its reads are scored.
A chat job the guard calls harmful gets the refusal at once; one it lets through waits for its
reply, decoded between scoring batches (scoring goes first, so moderation latency does not wait on
replies being written). The greedy replies waiting when one starts (without penalties, under the
same steering; up to ``max_reply_batch``) are decoded together in one ``generate`` call, each
streamed and stopped on its own; with an upstream engine, replies are the engine's and this
thread only scores (and, with a reply guard, reads the engine's reply tokens as they come, ahead
of queued jobs). Nothing else touches the model, so two requests never run it at once.

A chat job is scored as every read of its conversation (each message, and the last user message
in context); its verdict combines them. Replies never starve behind scoring: once a reply is
waiting, at most ``scoring_batches_per_reply`` scoring batches run before it starts.

Results go back to the event loop with ``call_soon_threadsafe``: a future per moderation job, a
queue of events per chat job (the verdict, then text pieces, then the finished reply). A job whose
client has gone (``cancel()``) is skipped if not started and stops decoding if it has.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..guard.conversations import score_reads
from ..guard.guarded import DEFAULT_REFUSAL
from .errors import ApiError, internal_error
from .jobs import CallJob, ChatJob, Job, ScoreJob
from .schemas import Verdict
from .upstream_replies import end_of_turn_ids
from .verdict_rows import combine_rows, report_rows
from .worker_replies import ReplyDecoding

__all__ = ["GuardWorker", "WorkerStats"]

logger = logging.getLogger("pyvene_harm.serve")

_STOP = object()
_WAKE = object()  # queued beside an in-hand call so that a worker waiting for jobs looks at it


@dataclass
class WorkerStats:
    """Counters shown by ``GET /health``: enough to see that batching and cancelling work."""

    batches: int = 0
    prompts_scored: int = 0
    largest_batch: int = 0
    replies: int = 0
    replies_cancelled: int = 0
    replies_stopped: int = 0
    """Replies the reply guard ended (``finish_reason: content_filter``) as they were written."""
    reply_batches: int = 0
    """Batched ``generate`` calls (each decoding two or more waiting replies together)."""
    largest_reply_batch: int = 0
    replies_unsteered: int = 0
    """Replies decoded plainly although steering is on: their system prompt is not the guard's."""
    tokens_generated: int = 0
    jobs_skipped: int = 0
    nonfinite_scores: int = 0
    busy: str | None = None
    """``scoring``, ``generating`` or None (idle)."""


class GuardWorker(ReplyDecoding):
    """Owns the model; see the module docstring.

    Args:
        guard: a fitted ``LatentGuard`` already bound to ``model`` and ``tokenizer``.
        steering: applied while decoding replies to prompts the guard lets through (e.g.
            ``ablate(model, directions, direction="refusal")``); None decodes plainly.
        max_batch: most reads (prompts, messages, pieces) scored in one ``guard.report`` call.
        max_batch_tokens: most tokens those reads may hold together (at least one read is
            scored): a batch, and so the wait of a request that arrives during it, stays bounded
            whatever one request holds. A request with more reads than fit is scored over several
            batches, with newer requests' reads joining each.
        max_wait_ms: longest wait for more requests after the first of a batch arrives.
        max_gap_ms: also stop waiting when no request has arrived for this long (None: wait
            the whole ``max_wait_ms``). A long ``max_wait_ms`` with a short gap gathers a burst
            of requests that trickles in, without making a lone request wait long.
        max_queue: most jobs waiting or running; more get 429 (server busy).
        max_reply_reads: with an upstream ``engine`` and a ``reply_guard``, most chat jobs waiting
            or relayed at once (429 beyond): each reply's read holds its KV cache until it ends.
        refusal_message: the reply to prompts the guard calls harmful.
        scoring_batches_per_reply: most scoring batches run while a reply waits.
        reply_guard: a fitted ``ReplyGuard`` for ``model``: every reply decoded here is judged
            as it is written, from the decoding forward's states, and ends before the token it
            turns harmful at; with an upstream ``engine``, from this copy's read of the engine's
            reply tokens (:mod:`~pyvene_harm.serve.upstream_replies`).
        steer_any_system_prompt: apply ``steering`` whatever the conversation's system prompt.
            By default a conversation whose system prompt is not the one the guard judged with is
            answered plainly: removing the refusal direction is only safe where the guard's
            verdict was formed under the same instructions.
    """

    def __init__(self, guard: Any, model: Any, tokenizer: Any, *, steering: Any | None = None,
                 max_batch: int = 32, max_wait_ms: float = 10.0, max_gap_ms: float | None = None,
                 max_queue: int = 1024, refusal_message: str = DEFAULT_REFUSAL,
                 scoring_batches_per_reply: int = 2, steer_any_system_prompt: bool = False,
                 max_batch_tokens: int = 16384, engine: Any | None = None, max_reply_batch: int = 1,
                 reply_guard: Any | None = None, max_reply_reads: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}")
        if max_gap_ms is not None and max_gap_ms < 0:
            raise ValueError(f"max_gap_ms must be 0 or more, got {max_gap_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
        if max_reply_batch < 1:
            raise ValueError(f"max_reply_batch must be at least 1, got {max_reply_batch}")
        if max_reply_reads < 1:
            raise ValueError(f"max_reply_reads must be at least 1, got {max_reply_reads}")
        if scoring_batches_per_reply < 1:
            raise ValueError(f"scoring_batches_per_reply must be at least 1, got {scoring_batches_per_reply}")
        self.guard, self.model, self.tokenizer, self.steering = guard, model, tokenizer, steering
        self.engine = engine  # an UpstreamEngine decodes the replies; None: this thread does
        self.reply_guard = reply_guard  # judges each reply from the decoding forward's states
        # an upstream reply's end of turn is not read (as in-process); worked out once, not per reply
        self._end_ids = end_of_turn_ids(model, tokenizer) if reply_guard is not None and engine is not None else []
        self.max_reply_batch = max_reply_batch
        # each upstream reply read holds a KV cache until the reply ends: chats are counted apart
        self.max_reply_reads = max_reply_reads if reply_guard is not None and engine is not None else None
        self._chats = 0  # chat jobs queued or running: each ends in _finished, like every queued job
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.max_gap = self.max_wait if max_gap_ms is None else min(self.max_wait, max_gap_ms / 1000.0)
        self.refusal_message = refusal_message
        self.scoring_batches_per_reply = scoring_batches_per_reply
        self.steer_any_system_prompt = steer_any_system_prompt
        self.categories = [str(c) for c in getattr(guard, "categories_", [])]
        self.formatter = guard.chat_formatter()
        self.stats = WorkerStats()
        self._queue: queue.Queue = queue.Queue()
        self.max_batch_tokens = max_batch_tokens
        self._held: Any = None  # the stop signal, taken while a batch was being formed
        self._active: list[Job] = []  # jobs with reads left to score, in order of arrival
        self._replies: deque[ChatJob] = deque()
        self._in_hand: deque[CallJob] = deque()  # reads of replies in flight: run before any new job
        self._batches_while_waiting = 0  # scoring batches run since the oldest waiting reply was queued
        self._lock = threading.Lock()
        self._outstanding = 0
        self._thread: threading.Thread | None = None
        self._stopped = False

    # --- the event loop's side ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this worker has already been started")
        self._thread = threading.Thread(target=self._run, name="pyvene-harm-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 2.0) -> None:
        """Stop decoding the reply in hand, fail the queued jobs (503), and end the thread.

        The worker notices between scoring batches (each bounded by ``max_batch_tokens``) and
        between decoded tokens; waiting longer than ``timeout`` for the batch in hand would only
        delay a shutdown (the thread is a daemon and ends with the process)."""
        self._stopped = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job, *, in_hand: bool = False) -> None:
        """Queue a job, or raise 503 (stopping) / 429 (``max_queue`` jobs already in hand, or
        ``max_reply_reads`` chats whose upstream replies are read).

        ``in_hand`` (a :class:`CallJob` for a request already admitted: a read of its reply): run
        before any queued job and after at most the scoring batch in progress, never refused as
        busy and not counted against ``max_queue`` (its request already is)."""
        if self._stopped or self._thread is None or not self._thread.is_alive():
            raise ApiError(503, "the server is not running its model (starting or shutting down): retry later",
                           type="server_error", code="unavailable")
        if in_hand:
            if not isinstance(job, CallJob):
                raise TypeError("only a CallJob can be run in hand")
            self._in_hand.append(job)
            self._queue.put(_WAKE)
            return
        with self._lock:
            if self._outstanding >= self.max_queue:
                raise ApiError(429, f"the server is busy: {self._outstanding} requests are queued or running "
                                    f"(--max-queue {self.max_queue}); retry later", type="server_error",
                               code="server_busy")
            if self.max_reply_reads is not None and isinstance(job, ChatJob):
                if self._chats >= self.max_reply_reads:
                    raise ApiError(429, f"the server is busy: {self._chats} guarded replies are queued or being "
                                        f"relayed (--max-reply-reads {self.max_reply_reads}); retry later",
                                   type="server_error", code="server_busy")
            self._chats += isinstance(job, ChatJob)
            self._outstanding += 1
        self._queue.put(job)

    async def score(self, prompts: list[str]) -> list[Verdict]:
        """The guard's verdicts for ``prompts``, scored in a batch with whatever else is waiting."""
        job = ScoreJob(asyncio.get_running_loop(), prompts)
        self.submit(job)
        try:
            return await job.future
        finally:
            job.cancel()  # a no-op once answered; drops the job if this caller was cancelled

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            outstanding = self._outstanding
        return {**asdict(self.stats), "outstanding": outstanding, "replies_waiting": len(self._replies),
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000.0, "max_gap_ms": self.max_gap * 1000.0,
                "max_queue": self.max_queue}

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._run_in_hand()
                if self._replies and self._batches_while_waiting >= self.scoring_batches_per_reply:
                    self._reply_next()  # scoring traffic must not starve replies
                    self._batches_while_waiting = 0
                    continue
                jobs = self._collect(block=not self._replies and not self._active)
                if jobs is None:
                    break
                for call in [j for j in jobs if isinstance(j, CallJob)]:
                    jobs.remove(call)
                    self._run_call(call)
                self._active.extend(jobs)
                if self._active:
                    self._score_next()
                    if self._replies:
                        self._batches_while_waiting += 1
                elif self._replies:
                    self._reply_next()
                    self._batches_while_waiting = 0
            except Exception:  # a bug must not kill the thread every request waits on
                logger.exception("the model worker failed")
            finally:
                self.stats.busy = None
        self._drain()

    def _take(self, timeout: float | None) -> Any:
        """The next job (``None`` when none came within ``timeout``; 0 = do not wait)."""
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get_nowait() if timeout == 0 else self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _collect(self, *, block: bool) -> list[Job] | None:
        """The jobs that arrive for the next batch: the first (waiting for it when ``block``),
        then whatever arrives within ``max_wait`` (and within ``max_gap`` of the last arrival)
        until they hold ``max_batch`` reads; [] when nothing is waiting; None when stopping."""
        first = self._take(None if block else 0)
        if first is None or first is _WAKE:
            return []
        if first is _STOP:
            return None
        jobs, n = [first], len(first.prompts) + self._unscored()
        last = time.monotonic()
        deadline = last + self.max_wait
        while n < self.max_batch:
            job = self._take(max(0.0, min(deadline, last + self.max_gap) - time.monotonic()))
            if job is None:
                break
            if job is _STOP:
                self._held = job  # stop once the jobs in hand are answered
                break
            if job is _WAKE:  # a read of a reply in flight waits for no batch to fill
                break
            last = time.monotonic()
            jobs.append(job)
            n += len(job.prompts)
        return jobs

    def _unscored(self) -> int:
        return sum(len(job.prompts) - job.scored for job in self._active)

    def _plan_batch(self) -> list[tuple[Job, int, int]]:
        """``(job, first read, end)`` parts of the next scoring batch: at most ``max_batch`` reads
        and ``max_batch_tokens`` tokens (at least one read). Jobs that have had fewer batches go
        first, in order of arrival, so a request that arrives while a large one is being scored
        waits for one batch, not for the whole of the other."""
        order = sorted(range(len(self._active)), key=lambda k: (self._active[k].batches, k))
        parts: list[tuple[Job, int, int]] = []
        reads = tokens = 0
        for k in order:
            job = self._active[k]
            start = i = job.scored
            while i < len(job.prompts) and reads < self.max_batch:
                t = job.tokens_of(i)
                if reads and tokens + t > self.max_batch_tokens:
                    break
                i, reads, tokens = i + 1, reads + 1, tokens + t
            if i > start:
                parts.append((job, start, i))
            if reads >= self.max_batch or tokens >= self.max_batch_tokens:
                break
        return parts

    def _score_next(self) -> None:
        """One scoring batch: jobs whose clients left (or whose time ran out) are dropped first,
        so the rest of a timed-out request is never scored."""
        for job in [j for j in self._active if j.cancelled]:
            self._active.remove(job)
            self._skip(job)
        parts = self._plan_batch()
        if parts:
            self._score_parts(parts)

    def _score(self, jobs: list[Job]) -> None:
        """Score ``jobs`` to the end, batch by batch (what the loop does with the jobs it takes)."""
        self._active.extend(jobs)
        while self._active and not self._stopped:
            self._score_next()

    def _run_call(self, job: CallJob) -> None:
        if job.cancelled:
            self._skip(job)
            return
        self.stats.busy = "scoring"
        try:
            value = job.fn()
        except Exception as exc:
            self._fail(job, exc)
            return
        job.finish(value)
        self._finished(job)

    def _finished(self, job: Job) -> None:
        with self._lock:
            self._outstanding -= 1
            self._chats -= isinstance(job, ChatJob)

    def _fail(self, job: Job, exc: BaseException) -> None:
        # requests are checked before they are queued (the app renders and counts every prompt):
        # whatever fails here is the server's fault, logged with its traceback, answered 500
        if isinstance(exc, ApiError):
            err = exc
        else:
            logger.error("request failed in the model worker", exc_info=exc)
            err = internal_error()
        if job in self._active:
            self._active.remove(job)
        job.fail(err)
        self._finished(job)

    def _skip(self, job: Job) -> None:
        self.stats.jobs_skipped += 1
        job.fail(ApiError(400, "the client disconnected before its request ran", code="client_disconnected"))
        self._finished(job)

    def _score_parts(self, parts: list[tuple[Job, int, int]]) -> None:
        reads = [r for job, a, b in parts for r in job.prompts[a:b]]
        self.stats.busy = "scoring"
        try:
            rep = score_reads(self.guard, reads)
        except Exception as exc:
            if len(parts) == 1:
                self._fail(parts[0][0], exc)
            else:  # one bad prompt must not fail the others: score each job's part on its own
                for part in parts:
                    self._score_parts([part])
            return
        self.stats.batches += 1
        self.stats.prompts_scored += len(reads)
        self.stats.largest_batch = max(self.stats.largest_batch, len(reads))
        at = 0
        for job, a, b in parts:
            job.rows += report_rows(rep, at, at + b - a)
            at += b - a
            job.scored, job.batches = b, job.batches + 1
            if job.scored == len(job.prompts):
                self._active.remove(job)
                self._complete(job)

    def _complete(self, job: Job) -> None:
        """Every read of ``job`` is scored: one verdict per group, then the answer or the reply."""
        mine, at = [], 0
        for group in job.groups:
            rows = job.rows[at:at + len(group)]
            at += len(group)
            v = combine_rows(self.guard, [label for label, _ in group], rows, self.categories)
            self.stats.nonfinite_scores += sum(not np.isfinite(p["score"]) for p in v.parts)
            mine.append(Verdict(harmful=v.harmful, delta_harmful=v.delta_harmful, score=v.score,
                                probability=v.probability, category=v.category, category_scores=v.category_scores,
                                flagged_by=v.flagged_by, delta_refuse=v.delta_refuse,
                                refuse_probability=v.refuse_probability))
        if isinstance(job, ScoreJob):
            job.finish(mine)
            self._finished(job)
        else:
            self._after_verdict(job, mine[0])

    def _drain(self) -> None:
        """After stopping: every job still waiting gets a 503."""
        gone = ApiError(503, "the server is shutting down: retry on another instance", type="server_error",
                        code="unavailable")
        for job in self._in_hand:
            job.fail(gone)
        self._in_hand.clear()
        pending: list[Any] = [self._held, *self._active, *self._replies]
        self._active.clear()
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None and job is not _STOP and job is not _WAKE:
                job.fail(gone)
                self._finished(job)
