"""One reply, decoded token by token: text pieces as they come, and a stop switch.

Guarded generation (:func:`pyvene_harm.guard.guarded_generate`) writes whole replies for a batch;
a server must show text while it is written and stop writing when the client has gone. Both come
from one ``transformers`` stopping criterion, called after every new token: it decodes the reply
so far, hands on the new text, and ends generation when asked to. The decoding itself is the
library's (:func:`~pyvene_harm.generation.generate_ids`, plain or through the refusal-ablating
steering object), so a reply equals what ``guard generate`` writes for the same prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ..conversation import Conversation
from ..generation import generate_ids, greedy_config
from ..positions import ChatFormatter
from .reply_watch import ReplyWatch

__all__ = ["Reply", "ReplyRequest", "generate_reply", "generate_reply_batch"]


@dataclass(frozen=True)
class Reply:
    """What decoding produced: the text, token counts, and why it ended.

    ``finish_reason`` is ``stop`` (end of turn), ``length`` (``max_new_tokens`` reached),
    ``cancelled`` (``should_stop`` said so: the client went away) or ``content_filter`` (the reply
    guard stopped it: ``text`` is what came before the token it flagged). ``reply_guard``: the
    reply guard's summary (:meth:`~pyvene_harm.serve.reply_watch.ReplyWatch.summary`) when one
    judged the reply.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    reply_guard: dict[str, Any] | None = None


class _Relay(StoppingCriteria):
    """Called after each new token: forward the new text; stop when ``should_stop()`` or when the
    text holds one of the ``stop`` strings (OpenAI's ``stop``: the reply ends before it).

    With ``judge`` (a reply guard's step: reply tokens written -> the token it flagged, or None),
    the newest token's text is held back until the guard has read it, and a flagged reply ends
    before the token it was caught at (:mod:`~pyvene_harm.serve.reply_watch`)."""

    def __init__(self, tokenizer: Any, prompt_len: int, on_text: Callable[[str], None] | None,
                 should_stop: Callable[[], bool] | None, stop: tuple[str, ...] = (),
                 judge: Callable[[int], int | None] | None = None) -> None:
        self.tokenizer, self.prompt_len = tokenizer, prompt_len
        self.on_text, self.should_stop = on_text, should_stop
        self.stop, self.judge = stop, judge
        self.cut_at: int | None = None
        # text that may be the start of a stop string is held back until it is not
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped_at: int | None = None
        self.sent = ""

    def flush(self, text: str, *, final: bool = False) -> None:
        if not final and self.hold:
            text = text[:max(len(self.sent), len(text) - self.hold)]
        # a byte-level tokenizer can stop mid-character (shown as U+FFFD): wait for the rest
        if self.on_text is not None and len(text) > len(self.sent) and text.startswith(self.sent) \
                and (final or not text.endswith("\ufffd")):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def finish(self, new_ids: list[int]) -> str:
        """The reply's final text from its token ids: cut at the stop string (or before the token
        the reply guard flagged), the rest streamed."""
        if self.cut_at is not None:
            new_ids = new_ids[:self.cut_at]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        if self.stopped_at is not None:
            text = text[:self.stopped_at]
        self.flush(text, final=True)
        if self.on_text is not None and not text.startswith(self.sent):  # decoding rewrote earlier text (rare)
            text = self.sent
        return text

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = False
        shown = input_ids.shape[1]
        if self.judge is not None:
            self.cut_at = self.judge(shown - self.prompt_len)
            # the newest token is read by the next forward: show it only then
            shown = shown - 1 if self.cut_at is None else self.prompt_len + self.cut_at
            done = self.cut_at is not None
        if self.on_text is not None or self.stop:
            text = self.tokenizer.decode(input_ids[0, self.prompt_len:shown], skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits and self.cut_at is None:
                self.stopped_at, done = min(hits), True
                text = text[:self.stopped_at]
            self.flush(text, final=done)
        stop = done or (bool(self.should_stop()) if self.should_stop is not None else False)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _Penalties(LogitsProcessor):
    """OpenAI's ``frequency_penalty`` and ``presence_penalty``: each token's logit lowers by the
    first times the number of times it already appears in the reply, and by the second once it
    appears at all (counted over the reply's tokens, as vLLM does, not the prompt's)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:]
        if new.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def generate_reply(
    model: nn.Module,
    formatter: ChatFormatter,
    instruction: str | Conversation,
    *,
    max_new_tokens: int,
    steering: Any | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stop: tuple[str, ...] = (),
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    reply_guard: Any | None = None,
) -> Reply:
    """Decode one reply to ``instruction`` (or to a whole conversation), greedily unless
    ``temperature > 0``.

    Args:
        formatter: chat formatting of the prompt (its system prompt included, unless the
            conversation brings its own).
        steering: e.g. ``ablate(model, directions, direction="refusal")``; plain when None.
        temperature, top_p: sampling; ``None`` or ``0`` is greedy decoding.
        seed: seeds torch's generator before sampling, for repeatable samples.
        on_text: called with each new piece of text; the pieces add up to ``Reply.text``.
        should_stop: polled after each token; True ends decoding (``finish_reason="cancelled"``).
        stop: strings that end the reply where they first appear (not included; ``"stop"``).
        frequency_penalty, presence_penalty: OpenAI's penalties on tokens the reply already
            holds (0 changes nothing, and nothing is applied then).
        reply_guard: a fitted :class:`~pyvene_harm.guard.reply.ReplyGuard` that reads the reply
            from the decoding forward's own states and ends it (``content_filter``) before the
            token where it turns harmful.

    Example:
        >>> generate_reply(model, ChatFormatter(tok), "Write a haiku", max_new_tokens=32,
        ...                on_text=lambda s: print(s, end="")).finish_reason
        'stop'
    """
    tokenizer = formatter.tokenizer
    device = next(model.parameters()).device
    batch = formatter.encode([instruction], padding_side="left").to(device)
    config = greedy_config(model, tokenizer, max_new_tokens)
    if temperature:
        config.do_sample, config.temperature, config.top_p = True, float(temperature), float(top_p or 1.0)
        if seed is not None:
            torch.manual_seed(seed)
    watch = ReplyWatch(reply_guard, model, 1) if reply_guard is not None else None
    relay = _Relay(tokenizer, batch.seq_len, on_text, should_stop, tuple(stop),
                   judge=None if watch is None else (lambda n: watch.step(0, n)))
    extra: dict[str, Any] = {}
    if frequency_penalty or presence_penalty:
        extra["logits_processor"] = LogitsProcessorList([_Penalties(batch.seq_len, frequency_penalty, presence_penalty)])
    with watch if watch is not None else nullcontext():
        ids = generate_ids(model, batch, config, steer=steering, stopping_criteria=StoppingCriteriaList([relay]),
                           **extra)
    new = ids[0, batch.seq_len:].tolist()
    if relay.cut_at is not None:
        reason = "content_filter"
    elif relay.stopped_at is not None or (new and new[-1] in _eos_ids(config)):
        reason = "stop"
    elif should_stop is not None and should_stop():
        reason = "cancelled"
    elif len(new) >= max_new_tokens:
        reason = "length"
    else:
        reason = "stop"
    return Reply(text=relay.finish(new), prompt_tokens=batch.seq_len, completion_tokens=len(new),
                 finish_reason=reason, reply_guard=None if watch is None else watch.summary(0))


def _eos_ids(config: Any) -> set[int]:
    return set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])


@dataclass
class ReplyRequest:
    """One greedy reply of a batch (:func:`generate_reply_batch`): its conversation, length,
    ``stop`` strings, and its own text and stop callbacks."""

    conversation: str | Conversation
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None


class _BatchRelay(StoppingCriteria):
    """Per row of a batch: one :class:`_Relay` and the step at which the row ended, and why."""

    def __init__(self, tokenizer: Any, prompt_len: int, requests: list[ReplyRequest], eos: set[int],
                 watch: ReplyWatch | None = None) -> None:
        self.rows = [_Relay(tokenizer, prompt_len, r.on_text, r.should_stop, tuple(r.stop),
                            judge=None if watch is None else (lambda n, i=i: watch.step(i, n)))
                     for i, r in enumerate(requests)]
        self.requests, self.prompt_len, self.eos = requests, prompt_len, eos
        self.ended: list[tuple[int, str] | None] = [None] * len(requests)  # (tokens, finish_reason)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n = input_ids.shape[1] - self.prompt_len
        for i, (relay, req) in enumerate(zip(self.rows, self.requests)):
            if self.ended[i] is not None:
                continue
            # the relay runs on the end-of-turn step too: that forward read the token before it,
            # which the reply guard judges (and the client sees) as when the row is decoded alone
            done = bool(relay(input_ids[i:i + 1], scores).all())
            if relay.cut_at is not None:
                self.ended[i] = (n, "content_filter")
            elif n and int(input_ids[i, -1]) in self.eos:
                self.ended[i] = (n, "stop")
            elif done:
                self.ended[i] = (n, "stop" if relay.stopped_at is not None else "cancelled")
            elif n >= req.max_new_tokens:
                self.ended[i] = (n, "length")
        return torch.tensor([e is not None for e in self.ended], dtype=torch.bool, device=input_ids.device)


def generate_reply_batch(model: nn.Module, formatter: ChatFormatter, requests: list[ReplyRequest], *,
                         steering: Any | None = None, reply_guard: Any | None = None) -> list[Reply]:
    """Decode several greedy replies in one ``generate`` call (left-padded), each streamed and
    stopped on its own: a row ends at its end of turn, its ``max_new_tokens``, its first ``stop``
    string or when its ``should_stop()`` says so, while the others go on.

    What a server gains when replies arrive together: on a CPU one batched step costs little
    more than a single one, on a GPU almost nothing more. Padding changes the order float32 sums
    are taken in, so a batched greedy reply can differ from the same reply decoded alone where
    two tokens are within rounding of each other. ``reply_guard`` judges every row as
    :func:`generate_reply` does.
    """
    tokenizer = formatter.tokenizer
    device = next(model.parameters()).device
    batch = formatter.encode([r.conversation for r in requests], padding_side="left").to(device)
    config = greedy_config(model, tokenizer, max(r.max_new_tokens for r in requests))
    watch = ReplyWatch(reply_guard, model, len(requests)) if reply_guard is not None else None
    relay = _BatchRelay(tokenizer, batch.seq_len, requests, _eos_ids(config), watch)
    with watch if watch is not None else nullcontext():
        ids = generate_ids(model, batch, config, steer=steering, stopping_criteria=StoppingCriteriaList([relay]))
    replies = []
    for i, row in enumerate(relay.rows):
        n, reason = relay.ended[i] or (ids.shape[1] - batch.seq_len, "length")
        new = ids[i, batch.seq_len:batch.seq_len + n].tolist()
        replies.append(Reply(text=row.finish(new), prompt_tokens=int(batch.attention_mask[i].sum()),
                             completion_tokens=len(new), finish_reason=reason,
                             reply_guard=None if watch is None else watch.summary(i)))
    return replies
