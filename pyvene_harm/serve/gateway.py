"""LiteLLM's generic guardrail API (``POST /beta/litellm_basic_guardrail_api``), spoken by this server.

A LiteLLM proxy configured with ``guardrail: generic_guardrail_api`` and this server as its
``api_base`` posts, for each request it routes, what it extracted from it: ``texts``, and for chat
the messages themselves (``structured_messages``). The guard judges the messages as the chat
endpoint judges a conversation (every message alone, its pieces where it types control tokens,
the last user message in context) and every text that is not one of those messages on its own;
the answer is ``{"action": "BLOCKED", "blocked_reason": ...}`` or ``{"action": "NONE"}``, with the
same ``guard`` object the chat endpoint returns.

What the guard cannot read is refused with a 400 rather than let through: images, non-text
message parts, tool messages, tool calls and tool definitions, and replies (``input_type: "response"``: this guard reads the
request; set the guardrail's ``mode`` to ``pre_call`` or ``during_call``). LiteLLM treats a 400
from its guardrail as a failure and, by default (``fail_on_error``), does not call the model.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..conversation import Conversation
from ..guard.conversations import conversation_parts, text_parts
from .errors import ApiError
from .jobs import ScoreJob
from .schemas import Verdict, guard_summary

__all__ = ["GuardrailRequest", "guardrail_job", "guardrail_response"]

PATH = "/beta/litellm_basic_guardrail_api"


class _Lenient(BaseModel):
    # LiteLLM adds fields of its own (call ids, headers, metadata, its version) and may add more;
    # the ones read here are typed strictly, the rest are not this server's business
    model_config = ConfigDict(extra="ignore", strict=True)


class _Part(_Lenient):
    type: str
    text: str | None = None


class GuardrailMessage(_Lenient):
    role: str
    content: str | list[_Part] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


class GuardrailRequest(_Lenient):
    """What LiteLLM posts; ``images``, ``tools`` and ``tool_calls`` are read only to refuse them."""

    input_type: Literal["request", "response"]
    texts: list[str] | None = None
    structured_messages: list[GuardrailMessage] | None = None
    images: list[Any] | None = None
    tools: list[Any] | None = None
    tool_calls: list[Any] | None = None


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(req: GuardrailRequest) -> list[tuple[str, str]]:
    """(role, text) of every message with text; what the guard cannot read is a 400."""
    out = []
    for i, m in enumerate(req.structured_messages or []):
        if m.role not in _ROLES:
            raise ApiError(400, f"structured_messages[{i}] is a {m.role!r} message: this guard judges system, user "
                                "and assistant text only", param=f"structured_messages[{i}].role")
        if m.tool_calls or m.function_call:  # their arguments are text the model reads, unjudged here
            raise ApiError(400, f"structured_messages[{i}] carries tool calls: this guard judges text messages "
                                "only", param=f"structured_messages[{i}].tool_calls")
        parts = [m.content] if isinstance(m.content, str) else (m.content or [])
        texts = []
        for j, p in enumerate(parts):
            if isinstance(p, str):
                texts.append(p)
            elif p.type == "text" and p.text is not None:
                texts.append(p.text)
            else:
                raise ApiError(400, f"structured_messages[{i}].content[{j}] is a {p.type!r} part: this guard "
                                    "reads text only", param=f"structured_messages[{i}].content[{j}]")
        text = "".join(texts)
        if not text.strip():  # as the chat endpoint: and a skipped message would shift every label after it
            raise ApiError(400, f"structured_messages[{i}] ({m.role}) is empty: every message needs some "
                                "non-whitespace text", param=f"structured_messages[{i}].content")
        out.append((_ROLES[m.role], text))
    return out


def guardrail_job(loop: Any, req: GuardrailRequest, split_at: re.Pattern[str] | None,
                  max_texts: int) -> ScoreJob | None:
    """One scoring job whose single group holds every read of the request; None: nothing to read.

    Texts that are not messages are capped at ``max_texts`` (the moderation route's
    ``--max-inputs``): each is a read of its own, with the guard's template around it."""
    if req.input_type == "response":
        raise ApiError(400, "this guard judges requests, not replies (input_type 'response'): set the "
                            "guardrail's mode to pre_call or during_call", param="input_type")
    if req.images:
        raise ApiError(400, f"{len(req.images)} image(s) in the request: this guard reads text only, "
                            "so it cannot let them through", param="images")
    if req.tool_calls:
        raise ApiError(400, "the request carries tool calls: this guard judges text messages only",
                       param="tool_calls")
    if req.tools:  # their names and descriptions are text the model reads
        raise ApiError(400, f"the request defines {len(req.tools)} tool(s): this guard judges text messages "
                            "only, so it cannot let their descriptions through", param="tools")
    messages = _messages(req)
    last_user = max((i for i, (role, _) in enumerate(messages) if role == "user"), default=-1)
    reads: list[tuple[str, Any]] = []
    if last_user >= 0:  # read as the chat endpoint reads a conversation
        reads += conversation_parts(Conversation(tuple(messages[:last_user + 1])), split_at)
    for i, (role, text) in enumerate(messages[last_user + 1:], start=last_user + 1):
        reads += text_parts(f"structured_messages[{i}] ({role})", text, split_at)
    seen = {text for _, text in messages}
    extra = {}
    for i, text in enumerate(req.texts or []):
        if text.strip() and text not in seen:
            extra.setdefault(text, i)  # a text sent twice is read once
    if len(extra) > max_texts:
        raise ApiError(400, f"{len(extra)} texts besides the messages, over this server's limit of {max_texts} "
                            "(--max-inputs): split the request", param="texts")
    for text, i in extra.items():
        reads += text_parts(f"texts[{i}]", text, split_at)
    if not reads:
        return None
    return ScoreJob.of_reads(loop, reads)


def guardrail_response(verdict: Verdict | None) -> dict[str, Any]:
    """LiteLLM's answer shape: BLOCKED with the reason, or NONE; plus the guard's own summary."""
    if verdict is None:
        return {"action": "NONE"}
    summary = guard_summary(verdict, "refused" if verdict.harmful else "answered")
    if not verdict.harmful:
        return {"action": "NONE", "guard": summary}
    where = ", ".join(verdict.flagged_by) or "the request"
    score = "not finite" if summary["score"] is None else f"{summary['score']:.3g}"
    return {"action": "BLOCKED", "guard": summary,
            "blocked_reason": f"flagged as harmful by the latent guard (read: {where}; score {score}, "
                              f"probability {summary['probability']:.3g})"}
