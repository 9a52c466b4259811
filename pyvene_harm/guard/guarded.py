"""Guarded generation: refuse what the model believes harmful, answer (and un-refuse) the rest.

The model's refusal can be switched off by a jailbreak while its harmfulness belief stays high,
and it can refuse harmless prompts that merely look dangerous (XSTest). Guarded generation acts
on the belief instead: one early-exit prefill reads Delta_harmful, harmful prompts get a fixed
refusal without any decoding, and harmless ones are generated, optionally steered away from
refusal (``steer(..., direction="refusal", coeff=-1.0)``) to undo over-refusal.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import nn

from ..generation import generate_replies
from ..positions import ChatFormatter
from .latent import LatentGuard

__all__ = ["DEFAULT_REFUSAL", "GuardedReply", "guarded_generate", "summarize"]

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
ACTIONS = ("refused", "steered", "answered")


@dataclass(frozen=True)
class GuardedReply:
    """What guarded generation did for one prompt.

    ``delta_harmful`` is the model's Delta_harmful when the guard is a :class:`LatentGuard`
    (None for other guards, which have no such score); ``verdict`` is ``harmful`` or
    ``harmless``; ``action`` one of ``refused``, ``steered``, ``answered``.
    """

    prompt: str
    delta_harmful: float | None
    verdict: str
    action: str
    reply: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bind(guard: LatentGuard, model: nn.Module, tokenizer: Any) -> LatentGuard:
    """The guard reading this model: a shallow copy when it holds none (or another one), so the
    caller's guard is left as it was and no weights are copied."""
    if guard.model is model and (guard.tokenizer is not None or guard.formatter is not None):
        return guard
    bound = copy.copy(guard)
    # scoring renders prompts as the guard was fitted (its system prompt), not as generation does
    return bound.set_params(model=model, tokenizer=tokenizer)


def guarded_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    guard: Any,
    *,
    refusal_steering: Any | None = None,
    refusal_message: str = DEFAULT_REFUSAL,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    formatter: ChatFormatter | None = None,
    progress: bool = False,
) -> list[GuardedReply]:
    """Refuse prompts the guard calls harmful; generate the others, one report per prompt.

    Args:
        model: the served chat model.
        tokenizer: its tokenizer.
        prompts: user instructions.
        guard: a fitted :class:`LatentGuard` (scored on ``model`` with early exit; it must have
            been fitted on this model), or any object with ``predict(prompts)`` returning 1 for
            harmful, e.g. a :class:`GenerativeGuard`.
        refusal_steering: a steering object (``generate_batch(batch, generation_config)``), e.g.
            ``steer(model, directions, direction="refusal", coeff=-1.0, layer=...)``, used for
            the prompts judged harmless, to undo over-refusal.
        refusal_message: the reply given to harmful prompts (no decoding is spent on them).
        max_new_tokens: the length limit of generated replies.
        formatter: chat formatting for generation (default: the tokenizer's template).

    Example:
        >>> out = guarded_generate(m.model, m.tokenizer, prompts, guard,
        ...                        refusal_steering=steer(m.model, ds, direction="refusal", layer=11, coeff=-1.0))
        >>> [r.action for r in out]
        ['refused', 'steered']
    """
    if isinstance(prompts, str):
        raise TypeError(f"pass a list of prompts, not one string: use [{prompts[:40]!r}]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("empty prompt list: pass at least one prompt")
    if refusal_steering is not None and not hasattr(refusal_steering, "generate_batch"):
        raise TypeError(f"refusal_steering must have generate_batch(batch, generation_config) (a steering "
                        f"object from pyvene_harm.interventions), got {type(refusal_steering).__name__}")
    fmt = formatter or ChatFormatter(tokenizer)
    if isinstance(guard, LatentGuard):
        bound = _bind(guard, model, tokenizer)
        rep = bound.report(prompts)
        scores: list[float | None] = rep.delta_harmful.tolist()
        harmful = rep.harmful.tolist()
    elif hasattr(guard, "predict"):
        harmful = [bool(v) for v in np.asarray(guard.predict(prompts)).tolist()]
        scores = [None] * len(prompts)
    else:
        raise TypeError(f"guard must be a LatentGuard or have predict(prompts), got {type(guard).__name__}")
    if len(harmful) != len(prompts):
        raise ValueError(f"the guard returned {len(harmful)} verdicts for {len(prompts)} prompts")
    replies = [refusal_message] * len(prompts)
    keep = [i for i, h in enumerate(harmful) if not h]
    if keep:
        answers = generate_replies(model, fmt, [prompts[i] for i in keep], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, steer=refusal_steering,
                                   progress=progress and "answering harmless prompts")
        for i, a in zip(keep, answers):
            replies[i] = a
    action_ok = "steered" if refusal_steering is not None else "answered"
    return [GuardedReply(prompt=p, delta_harmful=None if s is None else float(s),
                         verdict="harmful" if h else "harmless", action="refused" if h else action_ok,
                         reply=r)
            for p, s, h, r in zip(prompts, scores, harmful, replies)]


def summarize(replies: Sequence[GuardedReply], judge: Any | None = None) -> dict[str, Any]:
    """Counts per action and, with a refusal judge, the share of replies that refuse.

    The refusal rate counts the guard's own refusals plus generated replies the judge calls
    refusals, which is what a user of the guarded model sees.
    """
    n = len(replies)
    out: dict[str, Any] = {"n": n, **{a: sum(r.action == a for r in replies) for a in ACTIONS}}
    if judge is not None and n:
        flags = judge([r.prompt for r in replies], [r.reply for r in replies])
        out["refusal_rate"] = sum(bool(f) for f in flags) / n
    return out
