"""A small stand-in for ``vllm serve``: the parts of its HTTP API the guard server uses.

``/v1/models`` lists a base model and one LoRA module, ``/tokenize`` tokenises with the tokenizer
it is given, ``/v1/completions`` streams a reply that names the prompt it read. Every request
body is recorded, and so is every stream the client closed before its end (``aborted``), which is
how vLLM learns to stop decoding a request. ``mode`` makes it misbehave: ``"slow"`` (a piece every
``delay_s``), ``"fail_mid"`` (an error event after two pieces), ``"http500"``, ``"refuse400"``,
``"no_ids"`` (no ``token_ids`` even when asked). Asked for ``return_token_ids``, each piece carries
its ids, as vLLM's do; ``pieces`` replaces the reply's pieces (a list of strings), for a reply a
test chooses.
Servers run in a thread of the test process (:func:`serve_in_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pyvene_harm.serve.process import free_port

BASE, ADAPTER = "base", "no-refusal"
PIECES = ["The engine", " read", " {n}", " tokens", "."]


class FakeEngine:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.mode = "ok"
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        self.aborted = 0
        self.pieces: list[str] | None = None
        self.app = self._build()

    def reply_pieces(self, body: dict[str, Any]) -> list[str]:
        pieces = list(self.pieces) if self.pieces is not None else [p.format(n=len(body["prompt"])) for p in PIECES]
        return pieces + ([" (steered)"] if body["model"] == ADAPTER else [])

    def reply_text(self, body: dict[str, Any]) -> str:
        return "".join(self.reply_pieces(body))

    def piece_ids(self, piece: str) -> list[int]:
        return list(self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": BASE, "object": "model"}, {"id": ADAPTER, "object": "model"}]}

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict[str, Any]:
            body = await request.json()
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return {"tokens": list(ids), "count": len(ids)}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.requests.append(body)
            if self.mode == "http500":
                return JSONResponse({"error": {"message": "engine exploded"}}, status_code=500)
            if self.mode == "refuse400":
                return JSONResponse({"error": {"message": "max_tokens is too large for this model"}},
                                    status_code=400)
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        return app

    async def _stream(self, body: dict[str, Any]):
        pieces = self.reply_pieces(body)
        with_ids = bool(body.get("return_token_ids")) and self.mode != "no_ids"
        finished = False
        try:
            for i, piece in enumerate(pieces):
                if self.mode == "fail_mid" and i == 2:
                    yield f"data: {json.dumps({'error': {'message': 'engine lost its worker', 'code': 500}})}\n\n"
                    finished = True
                    return
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                last = i == len(pieces) - 1
                choice = {"index": 0, "text": piece, "finish_reason": "stop" if last else None}
                if with_ids:
                    choice["token_ids"] = self.piece_ids(piece)
                chunk = {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(pieces),
                     "total_tokens": len(body["prompt"]) + len(pieces)}
            yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.aborted += 1


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a daemon thread; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
