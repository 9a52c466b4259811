"""The one thread that runs the model: guard scoring in dynamic batches, then replies one at a time.

Requests arrive on the event loop and become jobs on a queue. The worker takes the first job,
keeps taking jobs until it holds ``max_batch`` prompts, ``max_wait_ms`` have passed since the
first, or (with ``max_gap_ms``) no job has come for that long, and scores them all with one
``guard.report`` call (which splits them into forward passes
of ``guard.batch_size``). Moderation jobs are answered from that call. A chat job the guard
calls harmful gets the refusal at once; one it lets through waits for its reply, decoded
between scoring batches (scoring goes first, so moderation latency does not wait on replies being
written). Nothing else touches the model, so two requests never run it at once.

Results go back to the event loop with ``call_soon_threadsafe``: a future per moderation job, a
queue of events per chat job (the verdict, then text pieces, then the finished reply). A job whose
client has gone (``cancel()``) is skipped if not started and stops decoding if it has.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any

from ..guard.guarded import DEFAULT_REFUSAL
from ..positions import ChatFormatter
from .decoding import Reply, generate_reply
from .errors import ApiError, internal_error
from .jobs import ChatJob, Job, ScoreJob
from .schemas import Verdict

__all__ = ["GuardWorker", "WorkerStats"]

logger = logging.getLogger("pyvene_harm.serve")

_STOP = object()
_FORMATTERS_KEPT = 32  # distinct system prompts whose chat formatters (and template affixes) are cached


@dataclass
class WorkerStats:
    """Counters shown by ``GET /health``: enough to see that batching and cancelling work."""

    batches: int = 0
    prompts_scored: int = 0
    largest_batch: int = 0
    replies: int = 0
    replies_cancelled: int = 0
    tokens_generated: int = 0
    jobs_skipped: int = 0
    busy: str | None = None
    """``scoring``, ``generating`` or None (idle)."""


class GuardWorker:
    """Owns the model; see the module docstring.

    Args:
        guard: a fitted ``LatentGuard`` already bound to ``model`` and ``tokenizer``.
        steering: applied while decoding replies to prompts the guard lets through (e.g.
            ``ablate(model, directions, direction="refusal")``); None decodes plainly.
        max_batch: most prompts scored in one ``guard.report`` call.
        max_wait_ms: longest wait for more requests after the first of a batch arrives.
        max_gap_ms: also stop waiting when no request has arrived for this long (None: wait
            the whole ``max_wait_ms``). A long ``max_wait_ms`` with a short gap gathers a burst
            of requests that trickles in, without making a lone request wait long.
        max_queue: most jobs waiting or running; more get 429 (server busy).
        refusal_message: the reply to prompts the guard calls harmful.
    """

    def __init__(self, guard: Any, model: Any, tokenizer: Any, *, steering: Any | None = None,
                 max_batch: int = 32, max_wait_ms: float = 10.0, max_gap_ms: float | None = None,
                 max_queue: int = 1024, refusal_message: str = DEFAULT_REFUSAL) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}")
        if max_gap_ms is not None and max_gap_ms < 0:
            raise ValueError(f"max_gap_ms must be 0 or more, got {max_gap_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.guard, self.model, self.tokenizer, self.steering = guard, model, tokenizer, steering
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.max_gap = self.max_wait if max_gap_ms is None else min(self.max_wait, max_gap_ms / 1000.0)
        self.refusal_message = refusal_message
        self.categories = [str(c) for c in getattr(guard, "categories_", [])]
        self.stats = WorkerStats()
        self._queue: queue.Queue = queue.Queue()
        self._held: Any = None  # a job taken that did not fit in the batch being formed
        self._replies: deque[ChatJob] = deque()
        self._formatters: OrderedDict[str | None, ChatFormatter] = OrderedDict()
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

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the job in hand, fail the queued ones (503), and end the thread."""
        self._stopped = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise 503 (stopping) / 429 (``max_queue`` jobs already in hand)."""
        if self._stopped or self._thread is None or not self._thread.is_alive():
            raise ApiError(503, "the server is not running its model (starting or shutting down): retry later",
                           type="server_error", code="unavailable")
        with self._lock:
            if self._outstanding >= self.max_queue:
                raise ApiError(429, f"the server is busy: {self._outstanding} requests are queued or running "
                                    f"(--max-queue {self.max_queue}); retry later", type="server_error",
                               code="server_busy")
            self._outstanding += 1
        self._queue.put(job)

    async def score(self, prompts: list[str]) -> list[Verdict]:
        """The guard's verdicts for ``prompts``, scored in a batch with whatever else is waiting."""
        job = ScoreJob(asyncio.get_running_loop(), prompts)
        self.submit(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancel()
            raise

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            outstanding = self._outstanding
        return {**asdict(self.stats), "outstanding": outstanding, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000.0, "max_gap_ms": self.max_gap * 1000.0,
                "max_queue": self.max_queue}

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                jobs = self._collect(block=not self._replies)
                if jobs is None:
                    break
                if jobs:
                    self._score(jobs)
                elif self._replies:
                    self._reply(self._replies.popleft())
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
        """One batch: the first job, then whatever arrives within ``max_wait`` (and within
        ``max_gap`` of the last arrival) up to ``max_batch`` prompts; [] when nothing is waiting
        (and ``block`` is False); None when stopping."""
        first = self._take(None if block else 0)
        if first is None:
            return []
        if first is _STOP:
            return None
        jobs, n = [first], len(first.prompts)
        last = time.monotonic()
        deadline = last + self.max_wait
        while n < self.max_batch:
            job = self._take(max(0.0, min(deadline, last + self.max_gap) - time.monotonic()))
            if job is None:
                break
            last = time.monotonic()
            if job is _STOP or n + len(job.prompts) > self.max_batch:
                self._held = job  # next batch (or the stop, once this batch is done)
                break
            jobs.append(job)
            n += len(job.prompts)
        return jobs

    def _finished(self, job: Job) -> None:
        with self._lock:
            self._outstanding -= 1

    def _fail(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            err = exc
        elif isinstance(exc, (ValueError, TypeError)):
            # the library's input errors say what is wrong with the prompt and how to fix it
            err = ApiError(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        else:
            logger.exception("request failed in the model worker", exc_info=exc)
            err = internal_error()
        job.fail(err)
        self._finished(job)

    def _skip(self, job: Job) -> None:
        self.stats.jobs_skipped += 1
        job.fail(ApiError(400, "the client disconnected before its request ran", code="client_disconnected"))
        self._finished(job)

    def _verdicts(self, prompts: list[str]) -> list[Verdict]:
        rep = self.guard.report(prompts)
        per_cat = self.guard.category_scores(prompts) if self.categories else None
        out = []
        for i in range(len(prompts)):
            out.append(Verdict(
                harmful=bool(rep.harmful[i]), delta_harmful=float(rep.delta_harmful[i]),
                score=float(rep.score[i]), probability=float(rep.probability[i]),
                category=None if rep.category is None else str(rep.category[i]),
                category_scores=None if per_cat is None else dict(zip(self.categories, map(float, per_cat[i]))),
            ))
        return out

    def _score(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            (self._skip if job.cancelled else live.append)(job)
        if not live:
            return
        prompts = [p for job in live for p in job.prompts]
        self.stats.busy = "scoring"
        try:
            verdicts = self._verdicts(prompts)
        except Exception as exc:
            if len(live) == 1:
                self._fail(live[0], exc)
            else:  # one bad prompt must not fail the others: score each job on its own
                for job in live:
                    self._score([job])
            return
        self.stats.batches += 1
        self.stats.prompts_scored += len(prompts)
        self.stats.largest_batch = max(self.stats.largest_batch, len(prompts))
        at = 0
        for job in live:
            mine, at = verdicts[at:at + len(job.prompts)], at + len(job.prompts)
            if isinstance(job, ScoreJob):
                job.finish(mine)
                self._finished(job)
            else:
                self._after_verdict(job, mine[0])

    def _after_verdict(self, job: ChatJob, verdict: Verdict) -> None:
        job.emit("verdict", verdict)
        if not verdict.harmful:
            self._replies.append(job)
            return
        try:
            tokens = len(self._formatter(job.system_prompt).tokenize([job.instruction])[0].ids)
        except Exception as exc:
            self._fail(job, exc)
            return
        job.emit("done", Reply(text=self.refusal_message, prompt_tokens=tokens, completion_tokens=0,
                               finish_reason="content_filter"))
        self._finished(job)

    def _formatter(self, system_prompt: str | None) -> ChatFormatter:
        """Replies are formatted as the guard formats prompts, unless the request has its own
        system message; formatters are kept so their template affixes are rendered once."""
        fmt = self._formatters.pop(system_prompt, None)
        if fmt is None:
            if system_prompt is None:
                fmt = self.guard.chat_formatter()
            else:
                fmt = copy.copy(self.guard.chat_formatter())
                fmt.system_prompt = system_prompt
        self._formatters[system_prompt] = fmt
        while len(self._formatters) > _FORMATTERS_KEPT:
            self._formatters.popitem(last=False)
        return fmt

    def _reply(self, job: ChatJob) -> None:
        if job.cancelled:
            self._skip(job)
            return
        self.stats.busy = "generating"
        try:
            reply = generate_reply(
                self.model, self._formatter(job.system_prompt), job.instruction,
                max_new_tokens=job.max_new_tokens, steering=self.steering, temperature=job.temperature,
                top_p=job.top_p, seed=job.seed, should_stop=lambda: job.cancelled,
                on_text=(lambda text: job.emit("text", text)) if job.stream else None,
            )
        except Exception as exc:
            self._fail(job, exc)
            return
        self.stats.replies += 1
        self.stats.tokens_generated += reply.completion_tokens
        if reply.finish_reason == "cancelled":
            self.stats.replies_cancelled += 1
        job.emit("done", reply)
        self._finished(job)

    def _drain(self) -> None:
        """After stopping: every job still waiting gets a 503."""
        gone = ApiError(503, "the server is shutting down: retry on another instance", type="server_error",
                        code="unavailable")
        pending: list[Any] = [self._held, *self._replies]
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None and job is not _STOP:
                job.fail(gone)
                self._finished(job)
