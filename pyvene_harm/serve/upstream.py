"""Replies from a separate serving engine (vLLM, or any OpenAI-compatible server taking token ids).

The guard server stays the front door: it renders and tokenises each conversation once, the guard
judges it, and a conversation it lets through is sent to the engine as those token ids
(``/v1/completions`` with ``prompt`` a list of ints), never as text, so a control token a client
typed stays text and the engine reads exactly the prompt the guard judged. The engine decodes
many conversations at once (continuous batching is its job); this module only relays its stream
into the chat job's events, which the app already turns into OpenAI chunks.

Steered replies go to the engine under another model name: the LoRA adapter of
``pyvene-harm export-adapter``, loaded with ``vllm serve ... --enable-lora --lora-modules
NAME=FOLDER``; vLLM batches requests with and without it together.

Faults at the seam are the client's to see, in OpenAI's error shape: an engine that cannot be
reached is 502, one that is too slow 504, one that refuses the request passes its 4xx on. A client
that goes away cancels the relay, which closes the engine's connection; vLLM then aborts the
request and stops decoding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decoding import Reply
from .errors import ApiError

__all__ = ["UpstreamEngine", "UpstreamError", "check_upstream"]

logger = logging.getLogger("pyvene_harm.serve")

# a text whose ids show whether two tokenizers agree: words, digits, accents, code, a chat marker
PROBE = "Tokenizer probe: naïve café 12345 <|im_start|> def f(x):\n    return x**2  # 東京"


class UpstreamError(RuntimeError):
    """The engine cannot be used (unreachable, wrong model or tokenizer): raised at start."""


@dataclass
class UpstreamEngine:
    """Where and how to reach the engine.

    Args:
        url: its base URL, e.g. ``http://127.0.0.1:8001`` (``/v1`` is added).
        model: the engine's name for the plain model (default: the first it lists).
        adapter: the engine's name for the steered model (a LoRA module), or None.
        timeout_s: the longest wait for the engine's next piece of a reply.
        api_key: sent as a Bearer token, if the engine wants one.
    """

    url: str
    model: str | None = None
    adapter: str | None = None
    timeout_s: float = 120.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--upstream {self.url!r} is not an http(s) URL: e.g. http://127.0.0.1:8001")
        self._client: Any = None
        self._tasks: set[asyncio.Task] = set()

    # --- start and stop ------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> Any:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.url, headers=self.headers(),
                timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self._client

    async def aclose(self) -> None:
        """Cancel every relay in flight (their clients get 503) and close the connections."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- one reply ----------------------------------------------------------------------------

    def submit(self, job: Any, prompt_ids: list[int], *, steer: bool, done: Callable[[], None],
               reading: Any | None = None) -> None:
        """Relay the engine's reply to ``job`` (from the worker thread; runs on the job's loop).
        ``reading`` (a :class:`~pyvene_harm.serve.upstream_replies.WorkerReplyRead`): the reply
        guard reads each piece's tokens before the piece is relayed, and a flagged reply ends."""
        def start() -> None:
            task = asyncio.ensure_future(self._relay(job, prompt_ids, steer, reading))
            self._tasks.add(task)
            job.on_cancel(task.cancel)

            def finished(t: asyncio.Task) -> None:
                self._tasks.discard(t)
                done()

            task.add_done_callback(finished)

        try:
            job.loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop has closed: nobody is waiting
            done()

    def request_body(self, job: Any, prompt_ids: list[int], steer: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.adapter if steer else self.model, "prompt": prompt_ids,
            "max_tokens": job.max_new_tokens, "temperature": float(job.temperature or 0.0),
            "stream": True, "stream_options": {"include_usage": True},
        }
        if job.temperature:
            body["top_p"] = float(job.top_p or 1.0)
        if job.seed is not None:
            body["seed"] = job.seed
        if job.stop:
            body["stop"] = list(job.stop)
        if job.frequency_penalty:
            body["frequency_penalty"] = job.frequency_penalty
        if job.presence_penalty:
            body["presence_penalty"] = job.presence_penalty
        return body

    async def _relay(self, job: Any, prompt_ids: list[int], steer: bool, reading: Any | None = None) -> None:
        import httpx

        text, reason, completion, flagged = [], None, None, None
        body = self.request_body(job, prompt_ids, steer)
        if reading is not None:
            body["return_token_ids"] = True  # the reply guard reads the engine's own tokens
        try:
            async with self.client().stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise _refused(response.status_code, (await response.aread()).decode("utf-8", "replace"))
                async with contextlib.aclosing(_batches(response, coalesce=reading is not None)) as batches:
                    async for batch in batches:
                        for chunk in batch:
                            completion = (chunk.get("usage") or {}).get("completion_tokens", completion)
                        pieces = [choice for chunk in batch for choice in chunk.get("choices") or ()]
                        relayed = len(pieces)
                        if reading is not None:
                            flagged, relayed = await self._read(reading, pieces)
                        for choice in pieces[:relayed]:
                            piece = choice.get("text") or ""
                            if piece:
                                text.append(piece)
                                if job.stream:
                                    job.emit("text", piece)
                            reason = choice.get("finish_reason") or reason
                        if flagged is not None:
                            break  # closing the stream makes the engine abort the request
            if reason is None and flagged is None:
                raise _engine_failed("its stream ended without a finish_reason")
        except asyncio.CancelledError:
            # the client left or its time ran out (the app answers it), or the server is stopping
            job.fail(ApiError(503, "the server is shutting down: retry on another instance", type="server_error",
                              code="unavailable"))
            raise
        except ApiError as err:
            job.fail(err)
            return
        except httpx.TimeoutException:
            job.fail(ApiError(504, f"the generation engine at {self.url} did not answer within {self.timeout_s:g} s",
                              type="server_error", code="upstream_timeout"))
            return
        except (httpx.HTTPError, OSError, ValueError) as err:
            logger.warning("generation engine failed: %s", err)
            job.fail(ApiError(502, f"the generation engine at {self.url} failed: {type(err).__name__}: {err}",
                              type="server_error", code="upstream_unavailable"))
            return
        finally:
            if reading is not None:
                reading.close()
        reply = "".join(text)
        if flagged is not None:
            job.emit("done", Reply(text=reply, prompt_tokens=len(prompt_ids), completion_tokens=reading.tokens_read,
                                   finish_reason="content_filter", reply_guard=reading.summary()))
            return
        job.emit("done", Reply(text=reply, prompt_tokens=len(prompt_ids),
                               completion_tokens=int(completion) if completion is not None else 0,
                               finish_reason="length" if reason == "length" else "stop",
                               reply_guard=None if reading is None else reading.summary()))

    async def _read(self, reading: Any, pieces: list[dict[str, Any]]) -> tuple[int | None, int]:
        """The reply guard's read of streamed pieces' tokens, all in one forward: ``(flagged, n)``
        with ``flagged`` the reply token that crossed the threshold (None: none) and ``n`` how many
        of the pieces may be relayed (those whose every token comes before it)."""
        ids = [self._token_ids(choice) for choice in pieces]
        if pieces and pieces[-1].get("finish_reason") == "stop":  # the end of turn is not read
            ids[-1] = reading.end_of_reply(ids[-1])
        start = reading.tokens_read
        flat = [t for part in ids for t in part]
        flagged = await reading.judge(flat) if flat else None
        if flagged is None:
            return None, len(pieces)
        ends = start + np.cumsum([len(part) for part in ids])
        return flagged, int(np.searchsorted(ends, flagged, side="right"))

    def _token_ids(self, choice: dict[str, Any]) -> list[int]:
        ids = choice.get("token_ids")
        if ids is None:
            if not choice.get("text"):
                return []
            raise ApiError(502, f"the generation engine at {self.url} sent a reply piece without its token ids: the "
                                "reply guard reads the engine's own tokens (vLLM's return_token_ids, vLLM >= 0.10.2); "
                                "upgrade the engine or serve without --reply-guard", type="server_error",
                           code="upstream_unavailable")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ApiError(502, f"the generation engine at {self.url} sent token_ids that are not a list of ints",
                           type="server_error", code="upstream_unavailable")
        return ids


async def _chunks(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The engine's streamed chunks, parsed; an error event raises."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise _engine_failed(chunk["error"])
        yield chunk


_END = object()


async def _batches(response: Any, *, coalesce: bool) -> AsyncIterator[list[dict[str, Any]]]:
    """The engine's chunks one at a time, or, with ``coalesce``, every chunk that arrived while the
    last batch was being read: the reply guard then reads several tokens in one forward of its copy
    (about the cost of one on a CPU) instead of one forward each, while other replies' reads wait
    on the same worker. A reader task keeps taking the stream meanwhile; its errors come out here."""
    if not coalesce:
        async for chunk in _chunks(response):
            yield [chunk]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def take() -> None:
        try:
            async for chunk in _chunks(response):
                queue.put_nowait(chunk)
            queue.put_nowait(_END)
        except Exception as err:  # handed to the consumer, which raises it
            queue.put_nowait(err)

    reader = asyncio.ensure_future(take())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            for i, item in enumerate(batch):
                if item is _END or isinstance(item, Exception):
                    if i:
                        yield batch[:i]
                    if item is _END:
                        return
                    raise item
            yield batch
    finally:
        reader.cancel()
        await asyncio.wait([reader])  # a cancellation of this task itself still propagates


def _refused(status: int, body: str) -> ApiError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:500]
    if 400 <= status < 500 and status not in (401, 403, 404):
        return ApiError(400, f"the generation engine refused the request: {message}", code="upstream_refused")
    return ApiError(502, f"the generation engine answered {status}: {message}", type="server_error",
                    code="upstream_unavailable")


def _engine_failed(error: Any) -> ApiError:
    message = error.get("message", error) if isinstance(error, dict) else error
    return ApiError(502, f"the generation engine failed mid-reply: {message}", type="server_error",
                    code="upstream_unavailable")


def check_upstream(engine: UpstreamEngine, tokenizer: Any, *, timeout_s: float = 10.0) -> UpstreamEngine:
    """Check, before serving, that the engine is up, serves the model and adapter, and tokenises
    as ``tokenizer`` does (the guard's model); fills in ``engine.model``. Raises UpstreamError."""
    import httpx

    try:
        with httpx.Client(base_url=engine.url, headers=engine.headers(), timeout=timeout_s) as http:
            r = http.get("/v1/models")
            if r.status_code != 200:
                raise UpstreamError(f"the generation engine at {engine.url} answered {r.status_code} to GET /v1/models: "
                                    "is it an OpenAI-compatible server (vllm serve)?")
            listed = [m.get("id") for m in r.json().get("data", [])]
            if not listed:
                raise UpstreamError(f"the generation engine at {engine.url} serves no model")
            if engine.model is None:
                engine.model = next((m for m in listed if m != engine.adapter), listed[0])
            for what, name in (("--upstream-model", engine.model), ("--upstream-adapter", engine.adapter)):
                if name is not None and name not in listed:
                    raise UpstreamError(f"{what} {name!r} is not served by {engine.url}: it serves {listed}")
            theirs = _engine_tokens(http, engine.model)
    except httpx.HTTPError as err:
        raise UpstreamError(f"cannot reach the generation engine at {engine.url}: {err}. Start it first "
                            "(vllm serve MODEL ...) or fix --upstream") from None
    ours = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if theirs is None:
        logger.warning("the generation engine at %s has no /tokenize: its tokenizer is not checked against the "
                       "guard's", engine.url)
    elif theirs != ours:
        raise UpstreamError(f"the generation engine at {engine.url} serves {engine.model!r}, whose tokenizer is not "
                            "the guard's model's: serve the guard's model there (token ids are sent as they are)")
    return engine


def _engine_tokens(http: Any, model: str) -> list[int] | None:
    r = http.post("/tokenize", json={"model": model, "prompt": PROBE, "add_special_tokens": False})
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise UpstreamError(f"POST /tokenize answered {r.status_code}: {r.text[:200]}")
    return list(r.json().get("tokens", []))
