"""Does the model's harmfulness belief follow what it is writing? Two readings along each reply.

At every reply token two numbers are read from the same forward over prompt + reply:

* the reply guard's window score (minus its threshold: above 0 streaming would stop the reply);
* **Delta_harmful** as the paper defines it at t_inst (:mod:`pyvene_harm.beliefs`): the cosine gap
  of the token's states to the harmful and harmless centroids of a DirectionSet, averaged over
  layers. The centroids were taken at the last instruction token of requests, never at reply
  tokens, so this asks whether the request-level belief carries over to the reply as it unfolds.

Over a whole reply set the question gets a number: with the mean Delta_harmful over a reply's
tokens as a score, how well are harmful replies told from safe ones (AUROC), and, among replies to
the same harmful requests, the replies that comply from the model's refusals? The second holds
the request fixed, so only what is written can move it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..beliefs import belief_per_layer, resolve_layers
from .metrics import auroc
from .reply_states import reply_token_states

__all__ = ["reply_belief_traces", "trace_summary"]


def reply_belief_traces(model: torch.nn.Module, formatter: Any, items: Sequence[Any], replies: Sequence[Any],
                        directions: Any, *, layers: Sequence[int] | None = None, keep: Sequence[int] = (),
                        batch_size: int = 8, chunk: int = 32,
                        progress: bool | str | None = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per reply, ``[T]`` Delta_harmful at each reply token, and the ``[T, len(keep), d]`` states
    ``keep`` (e.g. a reply guard's) from the same forward.

    ``layers``: the states Delta is averaged over (all ``L + 1`` by default, as the paper). Replies
    are read ``chunk`` at a time so that all states of a whole set are never held at once.
    """
    idx = resolve_layers(directions, layers)
    needed = sorted(set(idx) | set(int(s) for s in keep))
    c = directions.centroids
    pos, neg = c["harmful"][idx], c["harmless"][idx]
    li = [needed.index(s) for s in idx]
    ki = [needed.index(int(s)) for s in keep]
    deltas: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    for start in range(0, len(items), chunk):
        got = reply_token_states(model, formatter, items[start:start + chunk], replies[start:start + chunk],
                                 states=needed, batch_size=batch_size,
                                 progress=progress if start == 0 else False)
        for x in got:
            deltas.append(belief_per_layer(torch.from_numpy(x[:, li]), pos, neg).mean(-1).numpy())
            kept.append(np.ascontiguousarray(x[:, ki]))
    return deltas, kept


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def trace_summary(labels: Sequence[int], kinds: Sequence[str], deltas: Sequence[np.ndarray],
                  guard_scores: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Whole-set figures (module docstring): AUROC of the mean Delta_harmful over a reply's
    tokens, harmful against safe and complied against refused (same harmful requests), the mean
    per kind at the reply's first and last token and over it, and, with ``guard_scores``, the
    median per-reply correlation of the two readings along the tokens."""
    y = np.asarray(labels).astype(int)
    kinds = np.asarray(kinds, dtype=object)
    mean = np.array([float(d.mean()) for d in deltas])
    complied = np.isin(kinds, ["ablated", "accepted"])
    refused = kinds == "refusal"
    out: dict[str, Any] = {
        "n": len(y),
        "auroc_harmful_vs_safe": auroc(mean[y == 1], mean[y == 0]) if y.any() and (1 - y).any() else None,
        "auroc_complied_vs_refused": auroc(mean[complied], mean[refused]) if complied.any() and refused.any()
        else None,
        "per_kind": {},
    }
    for k in sorted(set(kinds.tolist())):
        own = kinds == k
        out["per_kind"][k] = {"n": int(own.sum()), "mean": float(mean[own].mean()),
                              "first_token": float(np.mean([deltas[i][0] for i in np.flatnonzero(own)])),
                              "last_token": float(np.mean([deltas[i][-1] for i in np.flatnonzero(own)]))}
    if guard_scores is not None:
        r = [_correlation(d, g) for d, g in zip(deltas, guard_scores)]
        r = [v for v in r if v is not None]
        out["median_correlation_with_reply_guard"] = float(np.median(r)) if r else None
    return out
