"""The OpenAI request shapes this server accepts, and the response bodies it writes.

Requests are parsed strictly (no string-to-number coercion, unknown fields refused) so that a
client's mistake is reported rather than guessed at; every failure becomes one
:class:`~.errors.ApiError` naming the field. Responses are plain dicts in the OpenAI shapes
(``moderation``, ``chat.completion``, ``chat.completion.chunk``) plus a ``guard`` object that says
what the Latent Guard decided.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..conversation import Conversation
from .errors import ApiError

__all__ = [
    "ChatRequest",
    "ModerationRequest",
    "Verdict",
    "chat_chunk",
    "chat_completion",
    "guard_summary",
    "moderation_response",
    "parse_request",
]

MIN_TEMPERATURE = 0.01
"""Sampling temperatures below this (other than 0, greedy) are refused: dividing the logits by
1e-300 overflows to infinity and sampling fails; 0.01 is already greedy in effect."""
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
"""What ``torch.manual_seed`` accepts."""
MAX_STOP = 4
"""Most stop strings a request may give (OpenAI's limit)."""


@dataclass(frozen=True)
class Verdict:
    """The guard's answer for one prompt (a row of ``LatentGuard.report``) or one conversation.

    Numbers that came out NaN or infinite (the prompt is then flagged) are written as ``null``:
    a response body never carries NaN or Infinity, which are not JSON.
    """

    harmful: bool
    delta_harmful: float
    probability: float
    category: str | None = None
    category_scores: dict[str, float] | None = None
    score: float | None = None
    """The score the threshold cuts (a linear read-out's log-odds); None: ``delta_harmful``."""
    flagged_by: tuple[str, ...] = ()
    """For a conversation: which reads called it harmful (``messages[0] (system)``, ``conversation``)."""
    delta_refuse: float | None = None
    """The model's refusal belief (Delta_refuse at t_post_inst), when the guard has a refusal read."""
    refuse_probability: float | None = None
    """P(the model would refuse), when that read is calibrated on the model's own refusals."""

    @property
    def decision(self) -> float:
        return self.delta_harmful if self.score is None else self.score


def _num(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModerationRequest(_Strict):
    """``POST /v1/moderations``: ``input`` is a string or a list of strings."""

    input: Any = None
    model: str | None = None

    def prompts(self) -> list[str]:
        x = self.input
        if isinstance(x, str):
            x = [x]
        if not isinstance(x, list):
            raise ApiError(400, "input must be a string or a list of strings, got "
                                f"{_json_type(self.input)}", param="input")
        if not x:
            raise ApiError(400, "input is an empty list: send at least one string", param="input")
        for i, item in enumerate(x):
            if not isinstance(item, str):
                raise ApiError(400, f"input[{i}] must be a string, got {_json_type(item)}", param=f"input[{i}]")
            if not item.strip():
                raise ApiError(400, f"input[{i}] is empty: every input needs some non-whitespace text",
                               param=f"input[{i}]")
        return x


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


def _message_pairs(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """``(role, text)`` of each message (developer read as system); a 400 names a tool or empty one."""
    pairs = []
    for i, m in enumerate(messages):
        if m.role == "tool":
            raise ApiError(400, f"messages[{i}] is a tool message: this server takes system, user and assistant "
                                "messages only", param=f"messages[{i}]")
        text = m.text()
        if not text.strip():
            raise ApiError(400, f"messages[{i}] ({m.role}) is empty: every message needs some non-whitespace text",
                           param=f"messages[{i}].content")
        pairs.append(("system" if m.role == "developer" else m.role, text))
    return pairs


class ReplyModerationRequest(_Strict):
    """``POST /v1/chat/moderations``: a conversation whose last message is the assistant's reply,
    judged by the reply guard in the context of the messages before it."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=2)

    def prompt_and_reply(self) -> tuple[Conversation, str]:
        pairs = _message_pairs(self.messages)
        if pairs[-1][0] != "assistant":
            raise ApiError(400, f"the last message must be the assistant's reply to judge, not "
                                f"{self.messages[-1].role!r}", param="messages")
        if pairs[-2][0] != "user":
            raise ApiError(400, "the reply must answer a user message: put the user's turn right before it",
                           param="messages")
        return Conversation(tuple(pairs[:-1])), pairs[-1][1]


class ChatRequest(_Strict):
    """``POST /v1/chat/completions``: a conversation of system (or developer), user and assistant
    messages, the last one the user's; the guard judges every message and the last user message
    in context (:meth:`~pyvene_harm.guard.LatentGuard.judge_conversations`)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = None
    seed: int | None = None
    user: str | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as OpenAI defines it: up to 4 strings the reply ends before."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"stop holds {len(stop)} strings: give at most {MAX_STOP}", param="stop")
        for i, s in enumerate(stop):
            if not s:
                raise ApiError(400, f"stop[{i}] is empty: a stop string needs at least one character", param="stop")
        return tuple(stop)

    def conversation(self) -> Conversation:
        """The messages as a :class:`~pyvene_harm.conversation.Conversation`, every sampling
        number checked; a 400 names the message or field at fault."""
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported: this server writes one choice per request (n=1)",
                           param="n")
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            raise ApiError(400, f"temperature={self.temperature!r} is too small to sample with: use 0 (greedy) or "
                                f"at least {MIN_TEMPERATURE}", param="temperature")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ApiError(400, "seed must fit in 64 bits", param="seed")
        self.stop_strings()
        pairs = _message_pairs(self.messages)
        if pairs[-1][0] != "user":
            raise ApiError(400, f"the last message must come from the user, not {self.messages[-1].role!r}",
                           param="messages")
        return Conversation(tuple(pairs))

    def new_tokens(self, cap: int) -> int:
        asked = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if asked is None:
            return cap
        if asked > cap:
            field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise ApiError(400, f"{field}={asked} is over this server's limit of {cap} new tokens: ask for fewer",
                           param=field)
        return asked


def parse_request(model: type[_Strict], body: bytes) -> Any:
    """Validate a JSON body against ``model``; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = _location(first["loc"])
        kind = first["type"]
        if kind == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON ({first['msg']}): send a JSON object",
                           code="invalid_json") from None
        if kind == "model_type" and not first["loc"]:
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json") from None
        if kind == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            raise ApiError(400, f"unsupported parameter {where!r}: this endpoint accepts {allowed}",
                           param=where, code="unsupported_parameter") from None
        if kind == "missing":
            raise ApiError(400, f"missing required parameter {where!r}", param=where) from None
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[_TextPart]") or "[" in str(part):
            continue  # the union member pydantic tried, not a field
        else:
            out += ("." if out else "") + str(part)
    return out


def _json_type(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(x), type(x).__name__)


# --- responses -------------------------------------------------------------------------------


def _categories(v: Verdict, names: list[str]) -> tuple[dict[str, bool], dict[str, float]]:
    flags = {"harmful": v.harmful}
    scores = {"harmful": _num(v.probability) if _num(v.probability) is not None else 1.0}
    for name in names:
        if name in flags:  # guards refuse such names; never let one overwrite the verdict
            continue
        flags[name] = v.harmful and v.category == name
        scores[name] = _num((v.category_scores or {}).get(name, 0.0)) or 0.0
    return flags, scores


def moderation_response(verdicts: list[Verdict], *, model: str, categories: list[str]) -> dict[str, Any]:
    """The OpenAI moderation object, one result per input.

    ``category_scores["harmful"]`` is the guard's probability; a guard fitted with harm
    categories adds one flag per category (set for the nearest category of a flagged input) and,
    under the same name, that category's mean cosine gap (a score, not a probability).
    """
    results = []
    for v in verdicts:
        flags, scores = _categories(v, categories)
        results.append({
            "flagged": v.harmful,
            "categories": flags,
            "category_scores": scores,
            "category_applied_input_types": {k: ["text"] for k in flags},
            "delta_harmful": _num(v.delta_harmful),
            "score": _num(v.decision),
            "probability": scores["harmful"],
            "category": v.category,
            **refusal_fields(v),
        })
    return {"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": results}


def guard_summary(v: Verdict, action: str) -> dict[str, Any]:
    """What the guard decided for a chat request (the ``guard`` field of every chat response)."""
    return {"flagged": v.harmful, "verdict": "harmful" if v.harmful else "harmless", "action": action,
            "delta_harmful": _num(v.delta_harmful), "score": _num(v.decision),
            "probability": _num(v.probability) if _num(v.probability) is not None else 1.0,
            "category": v.category, "flagged_by": list(v.flagged_by), **refusal_fields(v)}


def refusal_fields(v: Verdict) -> dict[str, Any]:
    """Both beliefs in every verdict: the model's refusal belief beside the harmfulness one, so an
    operator sees over-refusals (harmless, would refuse) and accepted harm (harmful, would comply)
    before a token is written; null when the guard has no refusal read."""
    return {"delta_refuse": _num(v.delta_refuse), "refuse_probability": _num(v.refuse_probability)}


def with_reply(summary: dict[str, Any], reply: dict[str, Any] | None) -> dict[str, Any]:
    """The chat ``guard`` object once the reply guard has read the reply: ``reply`` holds its
    finding, and a reply it stopped is ``action: "stopped"`` with ``reply (token N)`` in
    ``flagged_by`` (N counts reply tokens from 0)."""
    if reply is None:
        return summary
    score = reply.get("score")
    out = {**summary, "reply": {**reply, "score": _num(score) if score is not None else None}}
    if reply["flagged"]:
        out.update(action="stopped", flagged_by=[*summary["flagged_by"], f"reply (token {reply['token']})"])
    return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(*, id: str, model: str, text: str, finish_reason: str, guard: dict[str, Any],
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    refused = finish_reason == "content_filter"
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": text, "refusal": text if refused else None}}],
        "usage": _usage(prompt_tokens, completion_tokens),
        "guard": guard,
    }


def chat_chunk(*, id: str, model: str, created: int, delta: dict[str, Any] | None,
               finish_reason: str | None = None, guard: dict[str, Any] | None = None,
               usage: tuple[int, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` is the usage-only chunk that ends a stream."""
    out: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [] if delta is None else [
                               {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if guard is not None:
        out["guard"] = guard
    if usage is not None:
        out["usage"] = _usage(*usage)
    return out
