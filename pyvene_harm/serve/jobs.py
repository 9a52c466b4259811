"""What the event loop hands the model worker: a job per request, finished from the worker thread.

A job is created on the event loop and completed from the worker with ``call_soon_threadsafe``:
a :class:`ScoreJob` resolves one future with its verdicts; a :class:`ChatJob` feeds a queue of
events (the verdict, text pieces, the finished reply). ``cancel()`` marks a job whose client has
gone, so the worker skips it or stops decoding it.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

from ..conversation import Conversation
from ..guard.conversations import conversation_parts, text_parts
from .errors import ApiError
from .schemas import Verdict

__all__ = ["CallJob", "ChatJob", "Job", "ScoreJob"]


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)


class Job:
    """Something for the worker to do, created on the event loop, finished from the worker.

    ``groups`` holds, per verdict the job wants, the guard's reads behind it as ``(label,
    prompt)`` pairs (:func:`~pyvene_harm.guard.conversations.conversation_parts`): the worker
    scores every read of every job in one batch and combines each group into one verdict.
    """

    groups: list[list[tuple[str, Any]]]
    read_tokens: list[int] | None = None
    """Tokens of each read as the worker renders it (set by the app when it checks the request):
    what a scoring batch's token budget counts. None counts every read as one token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._cancelled = threading.Event()
        # the worker's bookkeeping: a job's reads may be scored over several batches
        self.scored = 0
        """Reads scored so far (in order)."""
        self.batches = 0
        """Scoring batches this job has had reads in."""
        self.rows: list[dict[str, Any]] = []
        """One row of the guard's report per read scored."""

    @property
    def prompts(self) -> list[Any]:
        """Every read of every group, in order."""
        if getattr(self, "_prompts", None) is None:
            self._prompts = [p for group in self.groups for _, p in group]
        return self._prompts

    def tokens_of(self, i: int) -> int:
        return 1 if self.read_tokens is None else self.read_tokens[i]

    def cancel(self) -> None:
        """The client has gone: skip this job, or stop decoding its reply."""
        self._cancelled.set()
        for fn in self.__dict__.pop("_on_cancel", ()):
            self._call(fn)

    def on_cancel(self, fn: Any) -> None:
        """Call ``fn`` on the event loop when the job is cancelled (at once if it already is)."""
        if self.cancelled:
            self._call(fn)
        else:
            self.__dict__.setdefault("_on_cancel", []).append(fn)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _call(self, fn: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting
            pass

    def fail(self, err: ApiError) -> None:
        raise NotImplementedError


class ScoreJob(Job):
    """Score ``texts``; ``future`` gets one :class:`Verdict` per text (each read whole, and
    piece by piece when it types control tokens and ``split_at`` is given)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, texts: list[str],
                 split_at: re.Pattern[str] | None = None) -> None:
        super().__init__(loop)
        self.groups = [text_parts("input", t, split_at) for t in texts]
        self.future: asyncio.Future = loop.create_future()

    @classmethod
    def of_reads(cls, loop: asyncio.AbstractEventLoop, reads: list[tuple[str, Any]]) -> ScoreJob:
        """One verdict from ``reads`` (``(label, prompt)`` pairs, as a conversation's are),
        flagged when any read is: what a gateway asks of the guard for one whole request."""
        job = cls(loop, [])
        job.groups = [list(reads)]
        return job

    def finish(self, verdicts: list[Verdict]) -> None:
        self._call(_set_result, self.future, verdicts)

    def fail(self, err: ApiError) -> None:
        self._call(_set_exception, self.future, err)


class CallJob(Job):
    """Run ``fn()`` on the worker's thread (the one thread that may run the model), e.g. one
    bounded read of a finished reply; ``future`` gets its result."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Any) -> None:
        super().__init__(loop)
        self.groups, self.fn = [], fn
        self.future: asyncio.Future = loop.create_future()

    def finish(self, value: Any) -> None:
        self._call(_set_result, self.future, value)

    def fail(self, err: ApiError) -> None:
        self._call(_set_exception, self.future, err)


class ChatJob(Job):
    """Guard a conversation, then refuse or reply; ``events`` receives, in order,
    ``("verdict", Verdict)``, ``("text", str)`` pieces (when ``stream``) and ``("done", Reply)``,
    or ``("error", ApiError)`` at any point.

    Its one group holds the guard's reads of the conversation (every message, and the last user
    message in context), scored in the batch like any other prompts and combined into one verdict.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, conversation: Conversation, max_new_tokens: int,
                 stream: bool = False, temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, split_at: re.Pattern[str] | None = None, stop: tuple[str, ...] = (),
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> None:
        super().__init__(loop)
        self.groups = [conversation_parts(conversation, split_at)]
        self.conversation = conversation
        self.max_new_tokens, self.stream = max_new_tokens, stream
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.stop, self.frequency_penalty, self.presence_penalty = stop, frequency_penalty, presence_penalty
        self.events: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, value: Any) -> None:
        self._call(self.events.put_nowait, (kind, value))

    def fail(self, err: ApiError) -> None:
        self.emit("error", err)
