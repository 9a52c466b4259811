"""Serve a Latent Guard over HTTP, in the OpenAI API's shapes (needs the ``serve`` extra).

``POST /v1/moderations`` scores inputs with the guard; ``POST /v1/chat/completions`` answers
through guarded generation (refuse what the guard calls harmful, decode the rest, optionally with
the refusal direction ablated), plain or streamed. Concurrent requests are scored in dynamic
batches by one worker thread that owns the model; replies are decoded by that thread or, with an
:class:`UpstreamEngine`, by a serving engine (vLLM) that receives the token ids the guard judged.
``create_app`` builds the ASGI app; ``pyvene-harm serve`` runs it with uvicorn.
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError("pyvene_harm.serve needs FastAPI and uvicorn: pip install 'pyvene-harm[serve]'") from err

from .app import create_app
from .decoding import Reply, generate_reply
from .errors import ApiError
from .jobs import ChatJob, Job, ScoreJob
from .limits import Limits
from .process import ServerProcess, VllmProcess, free_port
from .schemas import Verdict
from .upstream import UpstreamEngine, UpstreamError, check_upstream
from .worker import GuardWorker, WorkerStats

__all__ = [
    "ApiError",
    "ChatJob",
    "GuardWorker",
    "Job",
    "Limits",
    "Reply",
    "ScoreJob",
    "ServerProcess",
    "UpstreamEngine",
    "UpstreamError",
    "Verdict",
    "VllmProcess",
    "WorkerStats",
    "check_upstream",
    "create_app",
    "free_port",
    "generate_reply",
]
