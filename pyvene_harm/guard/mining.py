"""Hard negatives: harmless prompts a guard gets wrong, found in a pool and added to its training.

A guard fitted on a few harmless sets flags harmless prompts unlike them (coding questions with
"kill" or "exploit" in them, other phrasings, other languages). Scoring a large pool of harmless
prompts with the first fit and adding the highest-scoring ones (its own false positives, or the
nearest to being one) teaches the read-out where harmless prompts actually lie. Cheap with a
:class:`~pyvene_harm.guard.states_cache.StatesCache`: the refit reuses every state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["mine_hard_negatives"]


def mine_hard_negatives(guard: Any, pools: Sequence[Any], n: int, *, exclude: Sequence[str] = (),
                        states_cache: Any = None) -> list[tuple[str, str]]:
    """The ``n`` pool prompts the fitted ``guard`` scores most harmful, as ``(prompt, pool name)``.

    Args:
        guard: a fitted :class:`~pyvene_harm.guard.LatentGuard` with its model.
        pools: prompt sets (``.name``, ``.path``, ``.prompts``) of harmless prompts.
        n: how many to take (all of the pools when they hold fewer).
        exclude: prompts already in the training set (never picked twice).
        states_cache: reuse and keep the pool's states (the refit then runs no prompt again).
    """
    if n <= 0:
        return []
    seen = set(exclude)
    cand: list[tuple[str, str]] = []
    for ps in pools:
        for p in ps.prompts:
            if p not in seen:
                seen.add(p)
                cand.append((p, f"{ps.name}:{ps.path}"))
    if not cand:
        return []
    texts = [p for p, _ in cand]
    scores = guard.decision_function(guard.prompt_states(texts, states_cache))
    scores = np.where(np.isfinite(scores), scores, np.inf)
    top = np.argsort(-scores, kind="stable")[:n]
    return [cand[i] for i in top]
