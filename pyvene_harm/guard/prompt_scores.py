"""How a fitted :class:`~pyvene_harm.guard.latent.LatentGuard` scores prompts: one pass over
them, batch by batch, giving every figure a verdict needs (centroid gaps per state, per category,
the read-out's score, the refusal belief at t_post_inst) from the same prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ..collect import collect_token_states
from ..positions import ChatFormatter
from ..reads import fixed_reads, scan_width, sentence_width
from ..sentences import instruction_pieces, sentence_decision, sentence_ends
from ..windows import max_window_scores, window_scores
from . import artifact
from .features import as_prompts, check_fits_model, iter_prompt_states
from .readout import centroid_gap
from .training import states_array

__all__ = ["prompt_scores", "scan_batches"]


def prompt_scores(guard: Any, X: Any, layers: Sequence[int], *, categories: bool = False,
                  readout: bool = False, refusal: bool = False) -> tuple:
    """``[n, C]`` cosine gaps over the columns of ``layers``, ``[n, K, C]`` per category if
    asked, and ``[n]`` read-out scores if asked; one pass over prompts, batch by batch. With
    ``refusal`` a fourth item: ``([n] Delta_refuse, [n] P(refuses) or None)`` from the same
    pass, or None (no refusal read, or precomputed states)."""
    check_is_fitted(guard, msg=artifact.NOT_FITTED)
    cols = guard._columns(layers)
    pos = torch.from_numpy(guard.centroids_["harmful"][cols]).double()
    neg = torch.from_numpy(guard.centroids_["harmless"][cols]).double()
    cats = torch.from_numpy(guard.category_centroids_[:, cols]).double() if categories else None

    def score(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        cols_x = x[:, cols]
        g = centroid_gap(cols_x, pos, neg)
        gc = None if cats is None else np.stack([centroid_gap(cols_x, c, neg) for c in cats], axis=1)
        return g, gc, (guard.readout_.score(x) if readout else None)

    prompts = guard._as_read(as_prompts(X))
    if prompts is None:
        arr = states_array(guard, X, reset=False)
        got = score(torch.from_numpy(np.ascontiguousarray(arr)).double())
        return (*got, None) if refusal else got
    model, fmt = guard._require_model()
    read_refusal = refusal and getattr(guard, "refusal_read_", None) is not None
    # the read-out (and the refusal read) need every fitted state; centroid gaps only ``layers``
    full_width = readout or read_refusal
    need = guard.states_ if full_width else layers
    check_fits_model(guard.metadata_, guard.hidden_size_, need, model, fmt)
    reads = fixed_reads(guard.reads_)
    extra = ["t_post_inst"] if read_refusal and "t_post_inst" not in reads else []
    out = np.empty((len(prompts), len(cols)))
    out_c = np.empty((len(prompts), len(cats), len(cols))) if cats is not None else None
    out_r = np.empty(len(prompts)) if readout else None
    out_f = np.empty(len(prompts)) if read_refusal else None
    out_p = np.empty(len(prompts)) if read_refusal and guard.refusal_read_.calibrated else None
    windowed = scan_width(guard.reads_[0]) is not None or sentence_width(guard.reads_[0]) is not None
    batches = (scan_batches(guard, model, fmt, prompts, extra) if readout and windowed else
               ((idx, x, None) for idx, x in iter_prompt_states(
                   model, fmt, prompts, need, batch_size=guard.batch_size,
                   progress=guard.progress and "scoring prompts", reads=reads + extra)))
    n = len(guard.states_)
    if read_refusal:  # t_post_inst, from the same pass: its own block of columns
        at = (reads + extra).index("t_post_inst")
        post_cols = [at * n + guard.states_.index(s) for s in guard.refusal_read_.states]
    for idx, x, scanned in batches:
        if read_refusal:
            post = x[:, post_cols]
            out_f[idx], p = guard.refusal_read_.read(post)
            if out_p is not None:
                out_p[idx] = p
            x = x[:, :len(reads) * n]
        if not full_width:  # x holds exactly the columns of ``layers``: widen to the fitted layout
            full = torch.zeros((len(idx), len(guard.reads_) * len(guard.states_), x.shape[-1]), dtype=x.dtype)
            full[:, cols] = x
            x = full
        g, gc, r = score(x)
        if scanned is not None:
            r = scanned  # the highest (sentence-end) window's score, not the last window's
        out[idx] = g
        if out_c is not None:
            out_c[idx] = gc
        if out_r is not None:
            out_r[idx] = r
    return (out, out_c, out_r, (out_f, out_p)) if refusal else (out, out_c, out_r)


def scan_batches(guard: Any, model: Any, fmt: ChatFormatter, prompts: Sequence[Any], extra: Sequence[str] = ()):
    """``(indices, [b, F, d] last-window states, [b] window score)`` per batch: one pass that
    projects every instruction token on the read-out's weights (the ``extra`` reads' columns
    appended after the guard's own). The score is the highest window's for a ``scan:K`` read;
    for a ``sent:K`` read the sentence-end decision plus the threshold
    (:func:`~pyvene_harm.sentences.sentence_decision`), so that score - threshold is the verdict."""
    v, offset = guard.readout_.projection()  # [S, d]
    project = torch.from_numpy(np.ascontiguousarray(v.T)).float()
    reads = fixed_reads(guard.reads_) + list(extra)
    width, thr = sentence_width(guard.reads_[0]), guard.threshold_
    for idx, by_read, proj in collect_token_states(model, fmt, prompts, states=guard.states_,
                                                   positions=reads, project=project,
                                                   batch_size=guard.batch_size,
                                                   progress=guard.progress and "scoring prompts"):
        x = torch.cat([by_read[r] for r in reads], dim=1).to("cpu", torch.float64)
        if width is None:
            yield idx, x, max_window_scores(proj, guard.scan_width_, offset)[0]
            continue
        pieces = instruction_pieces(fmt, [prompts[i] for i in idx])
        yield idx, x, np.asarray([sentence_decision(window_scores(p, width, offset), sentence_ends(t), thr,
                                                    guard.sentence_margin_)[0] + thr for p, t in zip(proj, pieces)])
