"""Server-sent events of a chat job, and the watch that stops a job when its client goes away."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from .errors import ApiError
from .jobs import ChatJob
from .schemas import chat_chunk, with_reply

__all__ = ["cancel_on_disconnect", "chat_events", "timed_out"]


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, f"the request took longer than this server's limit of {timeout_s:g} s "
                         "(--request-timeout): retry later or ask for fewer tokens", type="server_error",
                    code="timeout")


async def cancel_on_disconnect(request: Request, job: ChatJob) -> None:
    """Stop the job when the client goes away (the body has been read: only a disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _sse(obj: dict[str, Any] | str) -> str:
    # allow_nan=False: a NaN that slipped through is a server error, never a body that is not JSON
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, allow_nan=False)}\n\n"


async def chat_events(job: ChatJob, watcher: asyncio.Task, guard: dict[str, Any], model: str,
                  include_usage: bool, deadline: float, timeout_s: float, refusal: str) -> AsyncIterator[str]:
    """The SSE stream of one chat job: a first chunk with the role and the guard's decision, the
    text as it is decoded, a last chunk with ``finish_reason`` (and, with a reply guard, the
    ``guard`` object saying what it found: a reply it stopped ends there, the refusal in the last
    chunk's ``refusal``), usage if asked, ``[DONE]``; an error event (and the job dropped) if the
    request's time runs out."""
    ids = {"id": f"chatcmpl-{uuid.uuid4().hex}", "model": model, "created": int(time.time())}
    try:
        yield _sse(chat_chunk(**ids, delta={"role": "assistant", "content": ""}, guard=guard))
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancel()
                yield _sse(timed_out(timeout_s).body())
                break
            if kind == "text":
                yield _sse(chat_chunk(**ids, delta={"content": value}))
            elif kind == "error":
                yield _sse(value.body())
                break
            elif kind == "done":
                stopped = value.reply_guard is not None and value.reply_guard["flagged"]
                if value.finish_reason == "content_filter" and not stopped:
                    yield _sse(chat_chunk(**ids, delta={"content": value.text, "refusal": value.text}))
                reason = "stop" if value.finish_reason == "cancelled" else value.finish_reason
                yield _sse(chat_chunk(**ids, delta={"refusal": refusal} if stopped else {}, finish_reason=reason,
                                      guard=None if value.reply_guard is None else with_reply(guard, value.reply_guard)))
                if include_usage:
                    yield _sse(chat_chunk(**ids, delta=None, usage=(value.prompt_tokens, value.completion_tokens)))
                break
        yield _sse("[DONE]")
    finally:
        job.cancel()  # the client went away mid-stream (or the stream ended: then a no-op)
        watcher.cancel()
