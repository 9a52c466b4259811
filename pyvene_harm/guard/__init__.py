"""Latent Guard: a prompt guard read from the served model's own harmfulness belief.

:class:`LatentGuard` (scikit-learn estimator, early-exit scoring, save/load/Hub),
:class:`GenerativeGuard` (a Llama Guard 3 style baseline with any causal LM) and
:func:`guarded_generate` (refuse what the model believes harmful, answer or un-refuse the rest).

Names load on first use (see :mod:`pyvene_harm.lazy_exports`): the CLI imports
``pyvene_harm.guard.metrics`` while building its help, which must not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .conversations import ConversationVerdict
    from .features import GuardMismatch
    from .generative import (
        LLAMA_GUARD_3_CATEGORIES,
        LLAMA_GUARD_3_PROMPT,
        LLAMA_GUARD_3_TASK,
        GenerativeGuard,
        GuardVerdict,
        llama_guard_3_task,
        parse_verdict,
    )
    from .guarded import DEFAULT_REFUSAL, GuardedReply, guarded_generate, summarize
    from .latent import UNCALIBRATED_TEMPERATURE, GuardReport, LatentGuard
    from .selection import (
        Selection,
        ThresholdChoice,
        choose_threshold,
        layer_prefixes,
        layer_windows,
    )

_EXPORTS = {
    "conversations": ("ConversationVerdict",),
    "features": ("GuardMismatch",),
    "generative": ("LLAMA_GUARD_3_CATEGORIES", "LLAMA_GUARD_3_PROMPT", "LLAMA_GUARD_3_TASK", "GenerativeGuard",
                   "GuardVerdict", "llama_guard_3_task", "parse_verdict"),
    "guarded": ("DEFAULT_REFUSAL", "GuardedReply", "guarded_generate", "summarize"),
    "latent": ("UNCALIBRATED_TEMPERATURE", "GuardReport", "LatentGuard"),
    "selection": ("Selection", "ThresholdChoice", "choose_threshold", "layer_prefixes", "layer_windows"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "ConversationVerdict",
    "DEFAULT_REFUSAL",
    "GenerativeGuard",
    "GuardMismatch",
    "GuardReport",
    "GuardVerdict",
    "GuardedReply",
    "LLAMA_GUARD_3_CATEGORIES",
    "LLAMA_GUARD_3_PROMPT",
    "LLAMA_GUARD_3_TASK",
    "LatentGuard",
    "Selection",
    "ThresholdChoice",
    "UNCALIBRATED_TEMPERATURE",
    "choose_threshold",
    "guarded_generate",
    "layer_prefixes",
    "layer_windows",
    "llama_guard_3_task",
    "parse_verdict",
    "summarize",
]
