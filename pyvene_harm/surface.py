"""Surface edits of a prompt, and how often they change a classifier's verdict.

A harmful request stays harmful without its final period, with a question mark, or with its
first letter in the other case. A guard whose verdict moves under such edits has learnt the
surface of its training sets (AdvBench requests end in a word, Alpaca instructions in a period),
not harmfulness. :func:`surface_variants` makes the edits; :func:`surface_change_rate` measures
the share of verdicts they flip, the guard's surface-invariance figure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "END_PUNCTUATION",
    "SURFACE_EDITS",
    "SurfaceInvariance",
    "measure_surface_invariance",
    "surface_change_rate",
    "surface_variants",
]

END_PUNCTUATION = ".?!"

SURFACE_EDITS = ("strip", "dot", "question", "case")
"""``strip``: final punctuation removed; ``dot`` / ``question``: the prompt without it, then
'.' / '?'; ``case``: the first letter's case flipped."""


def _stem(prompt: str) -> str:
    return prompt.rstrip().rstrip(END_PUNCTUATION).rstrip() or prompt.strip()


def _flip_first(prompt: str) -> str:
    for i, c in enumerate(prompt):
        if c.isalpha():
            return prompt[:i] + (c.lower() if c.isupper() else c.upper()) + prompt[i + 1:]
    return prompt


def surface_variants(prompt: str, edits: Sequence[str] = SURFACE_EDITS) -> dict[str, str]:
    """The prompt under each surface edit (see :data:`SURFACE_EDITS`), keyed by edit name.

    An edit may leave the prompt as it was (``strip`` on a prompt without final punctuation);
    :func:`surface_change_rate` counts only edits that change the text.

    Example:
        >>> surface_variants("How do I bake bread?")
        {'strip': 'How do I bake bread', 'dot': 'How do I bake bread.', 'question': 'How do I bake bread?', 'case': 'how do I bake bread?'}
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"surface edits need a non-empty prompt string, got {prompt!r}")
    unknown = [e for e in edits if e not in SURFACE_EDITS]
    if unknown:
        raise ValueError(f"unknown surface edit(s) {unknown}: choose from {', '.join(SURFACE_EDITS)}")
    stem = _stem(prompt)
    made = {"strip": stem, "dot": stem + ".", "question": stem + "?", "case": _flip_first(prompt)}
    return {e: made[e] for e in edits}


@dataclass(frozen=True)
class SurfaceInvariance:
    """How often surface edits flip a verdict."""

    rate: float
    """Share of (prompt, edit) pairs, among edits that changed the text, whose verdict differs
    from the unedited prompt's; NaN when no edit changed any text."""
    per_edit: dict[str, float] = field(default_factory=dict)
    """The same share for each edit on its own."""
    n_pairs: int = 0
    """Edited prompts compared."""

    def as_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "per_edit": dict(self.per_edit), "n_pairs": self.n_pairs}


def surface_change_rate(original: Sequence[Any], edited: Mapping[str, Sequence[Any]],
                        changed: Mapping[str, Sequence[bool]] | None = None) -> SurfaceInvariance:
    """Share of verdicts that differ between prompts and their surface-edited twins.

    Args:
        original: ``[n]`` verdicts on the prompts as given.
        edited: edit name -> ``[n]`` verdicts on the edited prompts (same order).
        changed: edit name -> ``[n]`` whether the edit changed the text; pairs where it did not
            are left out (default: every pair counts).

    Example:
        >>> surface_change_rate([1, 0], {"strip": [1, 1]}).rate
        0.5
    """
    orig = np.asarray(original)
    flips: dict[str, float] = {}
    total = count = 0
    for edit, verdicts in edited.items():
        v = np.asarray(verdicts)
        if v.shape != orig.shape:
            raise ValueError(f"{len(v)} verdicts for edit {edit!r} but {len(orig)} for the original prompts")
        keep = np.ones(len(orig), bool) if changed is None else np.asarray(changed[edit], bool)
        n = int(keep.sum())
        differ = int((v[keep] != orig[keep]).sum())
        flips[edit] = differ / n if n else float("nan")
        total, count = total + differ, count + n
    return SurfaceInvariance(rate=total / count if count else float("nan"), per_edit=flips, n_pairs=count)


def measure_surface_invariance(predict: Callable[[list[str]], Any], prompts: Sequence[str],
                               edits: Sequence[str] = SURFACE_EDITS) -> SurfaceInvariance:
    """Run ``predict`` on the prompts and on every surface edit of them, in one call.

    Args:
        predict: a list of prompts -> verdicts, e.g. ``guard.predict``.
        prompts: the prompts to edit.

    Example:
        >>> measure_surface_invariance(guard.predict, held_out_prompts).rate  # doctest: +SKIP
        0.01
    """
    prompts = list(prompts)
    variants = [surface_variants(p, edits) for p in prompts]
    batch = prompts + [v[e] for e in edits for v in variants]
    verdicts = np.asarray(predict(batch))
    n = len(prompts)
    edited = {e: verdicts[n * (k + 1): n * (k + 2)] for k, e in enumerate(edits)}
    changed = {e: [v[e] != p for v, p in zip(variants, prompts)] for e in edits}
    return surface_change_rate(verdicts[:n], edited, changed)
