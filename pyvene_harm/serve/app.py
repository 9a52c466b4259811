"""The HTTP layer: OpenAI-compatible routes over a :class:`~.worker.GuardWorker`.

``POST /v1/moderations`` and ``POST /v1/chat/completions`` (plain or streamed as server-sent
events, :mod:`.sse`), ``POST /v1/chat/moderations`` (a finished reply, with a reply guard), LiteLLM's generic guardrail API (``POST /beta/litellm_basic_guardrail_api``, see
:mod:`.gateway`), ``GET /v1/models`` and ``GET /health``. Each route checks the API key and the content
type, reads the body under a size limit and a deadline, validates it strictly, renders and counts
its prompts off the event loop (so a template that refuses a conversation is the client's 400, not
the worker's 500), and hands them to the worker under the request's deadline; the event loop
never runs the model. Nothing in a request names a file, a model to load or code to run: the only
model is the one the server was started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..guard.conversations import CONTEXT
from ..guard.guarded import DEFAULT_REFUSAL
from ..literal_text import control_token_pattern
from .errors import ApiError, error_body, internal_error
from .gateway import PATH as GATEWAY_PATH
from .gateway import GuardrailRequest, guardrail_job, guardrail_response
from .jobs import CallJob, ChatJob, Job, ScoreJob
from .limits import Limits
from .schemas import (
    ChatRequest,
    ModerationRequest,
    ReplyModerationRequest,
    Verdict,
    chat_completion,
    guard_summary,
    moderation_response,
    parse_request,
    with_reply,
)
from .sse import cancel_on_disconnect, chat_events, timed_out
from .worker import GuardWorker

__all__ = ["OPENAI_MODERATION_MODELS", "create_app"]

OPENAI_MODERATION_MODELS = ("omni-moderation-", "text-moderation-")
"""Model names ``/v1/moderations`` answers besides the served one: OpenAI's moderation models
(``omni-moderation-latest``, ``text-moderation-stable``, ...), the default of OpenAI's SDKs and of
gateways such as LiteLLM's ``openai_moderation`` guardrail."""

logger = logging.getLogger("pyvene_harm.serve")
T = TypeVar("T")


def create_app(guard: Any, model: Any, tokenizer: Any, *, model_name: str, steering: Any | None = None,
               limits: Limits | None = None, api_key: str | None = None,
               refusal_message: str = DEFAULT_REFUSAL, steer_any_system_prompt: bool = False,
               engine: Any | None = None, reply_guard: Any | None = None) -> FastAPI:
    """An ASGI app serving ``guard`` in front of ``model`` (run it with uvicorn).

    Args:
        guard: a fitted ``LatentGuard`` for ``model`` (a shallow copy is bound to it; the
            caller's guard is left as it was).
        model, tokenizer: the served chat model and its tokenizer.
        model_name: the name clients pass as ``model`` (listed by ``GET /v1/models``).
        steering: applied while decoding replies the guard lets through, e.g.
            ``ablate(model, directions, direction="refusal")`` to undo over-refusal.
        limits: request limits and batching (:class:`Limits`).
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        refusal_message: the reply to prompts the guard calls harmful.
        steer_any_system_prompt: apply ``steering`` to conversations whatever their system
            prompt; by default only under the system prompt the guard judged with.
        engine: an :class:`~.upstream.UpstreamEngine` (checked with ``check_upstream``) that
            decodes the replies the guard lets through, steered ones under its adapter's name;
            ``model`` then only scores. None: replies are decoded here, one at a time.
        reply_guard: a fitted ``ReplyGuard`` for ``model`` judging each reply as it is decoded
            here; a reply it flags ends with ``finish_reason: "content_filter"`` (a streamed one
            where it was caught, a whole one replaced by ``refusal_message``) and ``guard.reply``
            says where. With ``engine``, this process's copy reads the engine's reply tokens
            (:mod:`~.upstream_replies`).

    Example:
        >>> app = create_app(LatentGuard.from_pretrained("runs/guard"), m.model, m.tokenizer,
        ...                  model_name="demo")
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    limits = limits or Limits()
    bound = copy.copy(guard).set_params(model=model, tokenizer=tokenizer, progress=False)
    worker = GuardWorker(bound, model, tokenizer, steering=steering, max_batch=limits.max_batch,
                         max_batch_tokens=limits.max_batch_tokens,
                         max_wait_ms=limits.max_wait_ms, max_gap_ms=limits.max_gap_ms, max_queue=limits.max_queue,
                         refusal_message=refusal_message, scoring_batches_per_reply=limits.scoring_batches_per_reply,
                         max_reply_batch=limits.max_reply_batch, max_reply_reads=limits.max_reply_reads,
                         steer_any_system_prompt=steer_any_system_prompt, engine=engine,
                         reply_guard=None if reply_guard is None else copy.copy(reply_guard).set_params(
                             model=model, tokenizer=tokenizer))
    # requests are rendered and counted with a copy of the tokenizer, one thread at a time: a fast
    # tokenizer must not be used by two threads at once, and the worker thread uses the original
    counter = copy.deepcopy(tokenizer)
    checker = copy.copy(worker.formatter)
    checker.tokenizer = counter
    checking = threading.Lock()
    split_at = control_token_pattern(tokenizer)  # texts that type control tokens are also read in pieces
    key = api_key.encode() if api_key else None
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            if engine is not None:
                await engine.aclose()

    app = FastAPI(title="pyvene-harm Latent Guard", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = worker
    _install_error_handlers(app)

    def authorize(request: Request, *, x_api_key: bool = False) -> None:
        """The bearer token; with ``x_api_key`` also the ``x-api-key`` header (LiteLLM's guardrail
        client sends its ``api_key`` there)."""
        if key is None:
            return
        header = request.headers.get("authorization")
        if header is None and x_api_key and "x-api-key" in request.headers:
            header = "Bearer " + request.headers["x-api-key"]
        if header is None:
            also = " (or 'x-api-key: <key>')" if x_api_key else ""
            raise ApiError(401, f"missing API key: send the header 'Authorization: Bearer <key>'{also}",
                           code="invalid_api_key")
        scheme, _, token = header.partition(" ")
        # constant-time comparison: the time taken says nothing about how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(401, "incorrect API key: send the header 'Authorization: Bearer <key>' with the "
                                "server's key", code="invalid_api_key")

    def check_model(name: str, *, moderation: bool = False) -> None:
        # OpenAI's SDKs and gateways ask for OpenAI's moderation models by name: this server's
        # one guard answers for them (the response names the model it really is)
        if moderation and name.startswith(OPENAI_MODERATION_MODELS):
            return
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist here: this server serves {model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def too_long(n: int, where: str, pieces: int = 0) -> ApiError:
        counted = (f" counted with the {pieces} pieces it is also read in (it types control tokens)"
                   if pieces else "")
        return ApiError(400, f"{where} is {n} tokens long{counted}, over this server's limit of "
                             f"{limits.max_prompt_tokens} (--max-prompt-tokens): shorten it", param=where,
                        code="context_length_exceeded")

    def prepare(job: Job, param: str) -> list[list[int]]:
        """Render and tokenise every read of ``job`` as the worker will, so that whatever the
        model cannot take (a template that refuses a conversation, a prompt over the model's
        context) is the client's 400 here, never the worker's 500. Sets ``job.read_tokens`` (the
        worker's batch budget counts them) and returns, per group, the token count of each text
        read (as plain text: typed control tokens are text; the conversation read, which is its
        messages again, left out)."""
        texts = [[p for label, p in group if label != CONTEXT] for group in job.groups]
        try:
            with checking:
                job.read_tokens = [len(e.ids) for e in checker.tokenize(job.prompts)]
                flat = [t for group in texts for t in group]
                ids = counter(flat, add_special_tokens=False, return_attention_mask=False,
                              split_special_tokens=True)["input_ids"]
        except ValueError as err:
            raise ApiError(400, str(err).splitlines()[0], param=param) from None
        out, at = [], 0
        for group in texts:
            out.append([len(row) for row in ids[at:at + len(group)]])
            at += len(group)
        return out

    def check_inputs(job: ScoreJob) -> None:
        # a text that types control tokens is also read in pieces: they count, as the work they cost
        for i, counts in enumerate(prepare(job, "input")):
            if sum(counts) > limits.max_prompt_tokens:
                raise too_long(sum(counts), "input" if len(job.groups) == 1 else f"input[{i}]", len(counts) - 1)

    def check_conversation(job: ChatJob) -> None:
        (counts,) = prepare(job, "messages")
        if sum(counts) > limits.max_prompt_tokens:
            raise too_long(sum(counts), "messages", len(counts) - len(job.conversation.messages))

    def check_request(job: ScoreJob) -> None:
        (counts,) = prepare(job, "structured_messages")
        if sum(counts) > limits.max_prompt_tokens:
            whole = sum(1 for label, _ in job.groups[0] if label != CONTEXT and " piece " not in label)
            raise too_long(sum(counts), "structured_messages", len(counts) - whole)

    def require_json(request: Request) -> None:
        # a browser page can POST text/plain cross-site without asking; it cannot POST JSON
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the request body must be sent as Content-Type: application/json, not "
                                f"{kind or 'no content type'!r}", code="unsupported_media_type")

    async def read_body(request: Request) -> bytes:
        require_json(request)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            raise _too_large(length, limits.max_body_bytes)

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise _too_large(None, limits.max_body_bytes)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), limits.read_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {limits.read_timeout_s:g} s "
                                "(--read-timeout): send it in one go", code="request_timeout") from None

    async def before(deadline: float, awaitable: Awaitable[T], job: Job) -> T:
        """``awaitable``'s result, or 504 (and the job dropped) once the request's time is up."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            job.cancel()
            raise timed_out(limits.request_timeout_s) from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "worker": worker.snapshot(),
                "engine": "in-process" if engine is None else engine.url}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        check_model(name)
        return _model_card(model_name, created)

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> JSONResponse:
        deadline = time.monotonic() + limits.request_timeout_s
        authorize(request)
        req = parse_request(ModerationRequest, await read_body(request))
        if req.model is not None:
            check_model(req.model, moderation=True)
        prompts = req.prompts()
        if len(prompts) > limits.max_inputs:
            raise ApiError(400, f"{len(prompts)} inputs in one request, over this server's limit of "
                                f"{limits.max_inputs} (--max-inputs): split the request", param="input")
        job = ScoreJob(asyncio.get_running_loop(), prompts, split_at)
        await asyncio.to_thread(check_inputs, job)
        verdicts = await scored(job, request, deadline)
        return JSONResponse(moderation_response(verdicts, model=model_name, categories=worker.categories))

    @app.post("/v1/chat/moderations")
    async def reply_moderations(request: Request) -> JSONResponse:
        """The reply guard on a finished reply: the last (assistant) message, read in the context
        of the messages before it."""
        deadline = time.monotonic() + limits.request_timeout_s
        authorize(request)
        if worker.reply_guard is None:
            raise ApiError(404, "this server judges no replies: start it with --reply-guard DIR", code="not_found")
        req = parse_request(ReplyModerationRequest, await read_body(request))
        if req.model is not None:
            check_model(req.model, moderation=True)
        prompt, reply = req.prompt_and_reply()

        def count() -> int:
            try:
                with checking:
                    n = len(checker.tokenize([prompt])[0].ids)
                    return n + len(counter(reply, add_special_tokens=False, split_special_tokens=True)["input_ids"])
            except ValueError as err:
                raise ApiError(400, str(err).splitlines()[0], param="messages") from None

        n, cap = await asyncio.to_thread(count), limits.max_prompt_tokens + limits.max_new_tokens
        if n > cap:
            raise ApiError(400, f"the conversation and reply are {n} tokens long, over this server's limit of {cap} "
                                "(--max-prompt-tokens + --max-new-tokens): shorten them", param="messages",
                           code="context_length_exceeded")
        job = CallJob(asyncio.get_running_loop(), lambda: worker.reply_guard.judge(prompt, reply))
        worker.submit(job)
        try:
            found = await before(deadline, job.future, job)
        finally:
            job.cancel()
        found = {**found, "score": None if found["score"] is None else float(found["score"])}
        return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": model_name,
                             "results": [{"flagged": found["flagged"], "reply": found}]})

    @app.post(GATEWAY_PATH)
    async def litellm_guardrail(request: Request) -> JSONResponse:
        deadline = time.monotonic() + limits.request_timeout_s
        authorize(request, x_api_key=True)
        req = parse_request(GuardrailRequest, await read_body(request))
        job = guardrail_job(asyncio.get_running_loop(), req, split_at, limits.max_inputs)
        if job is None:
            return JSONResponse(guardrail_response(None))
        await asyncio.to_thread(check_request, job)
        (verdict,) = await scored(job, request, deadline)
        return JSONResponse(guardrail_response(verdict))

    async def scored(job: ScoreJob, request: Request, deadline: float) -> list[Verdict]:
        """Hand ``job`` to the worker; its verdicts, or 504 once the request's time is up."""
        worker.submit(job)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            return await before(deadline, job.future, job)
        finally:
            job.cancel()  # a no-op once answered
            watcher.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        deadline = time.monotonic() + limits.request_timeout_s
        authorize(request)
        req = parse_request(ChatRequest, await read_body(request))
        check_model(req.model)
        conv = req.conversation()
        max_new = req.new_tokens(limits.max_new_tokens)
        job = ChatJob(asyncio.get_running_loop(), conversation=conv, max_new_tokens=max_new, stream=req.stream,
                      temperature=req.temperature, top_p=req.top_p, seed=req.seed, split_at=split_at,
                      stop=req.stop_strings(), frequency_penalty=req.frequency_penalty or 0.0,
                      presence_penalty=req.presence_penalty or 0.0)
        await asyncio.to_thread(check_conversation, job)
        worker.submit(job)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        handed_over = False
        try:
            kind, value = await before(deadline, job.events.get(), job)
            if kind == "error":
                raise value
            verdict: Verdict = value
            if verdict.harmful:
                action = "refused"
            else:
                action = "steered" if worker.steers(job) else "answered"
            summary = guard_summary(verdict, action)
            if req.stream:
                usage = bool(req.stream_options and req.stream_options.include_usage)
                handed_over = True
                return StreamingResponse(chat_events(job, watcher, summary, model_name, usage, deadline,
                                                 limits.request_timeout_s, refusal_message),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while True:
                kind, value = await before(deadline, job.events.get(), job)
                if kind == "error":
                    raise value
                if kind == "done":
                    break
            if value.finish_reason == "cancelled":
                raise ApiError(400, "the client disconnected", code="client_disconnected")
            stopped = value.reply_guard is not None and value.reply_guard["flagged"]
            return JSONResponse(chat_completion(
                id=f"chatcmpl-{uuid.uuid4().hex}", model=model_name, text=refusal_message if stopped else value.text,
                finish_reason=value.finish_reason, guard=with_reply(summary, value.reply_guard),
                prompt_tokens=value.prompt_tokens,
                completion_tokens=value.completion_tokens))
        finally:
            if not handed_over:
                job.cancel()  # a no-op once the job is done; stops it if this handler was cancelled
                watcher.cancel()

    return app


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "pyvene-harm"}


def _too_large(length: str | None, limit: int) -> ApiError:
    size = f"{length} bytes" if length and length.isdigit() else "too large"
    return ApiError(413, f"the request body is {size}, over this server's limit of {limit} bytes "
                         "(--max-body-bytes): send less", code="request_too_large")


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path}: this server has POST /v1/moderations, "
                       f"POST /v1/chat/completions, POST {GATEWAY_PATH}, GET /v1/models and GET /health")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(message, code=str(exc.status_code)), status_code=exc.status_code)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # only input errors are the client's: anything else is logged with its traceback, answered 500
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        err = internal_error()
        return JSONResponse(err.body(), status_code=err.status)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
