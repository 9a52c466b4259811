"""The checks of :class:`~pyvene_harm.guard.latent.LatentGuard`'s parameters.

scikit-learn estimators check their parameters in ``fit`` (not ``__init__``, so that
``set_params`` and ``clone`` work); loading a saved guard runs the same checks, so a folder edited
by hand fails with the parameter named rather than deep inside scoring.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..reads import check_reads, scan_width, sentence_width
from .max_calibration import MAX_THRESHOLDS
from .readout import METHODS

__all__ = ["check_latent_params"]


def check_latent_params(guard: Any) -> list[str]:
    """Raise ValueError naming the first bad parameter of ``guard``; return its checked reads."""
    if not isinstance(guard.batch_size, int) or guard.batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {guard.batch_size!r}")
    if not np.isfinite(float(guard.threshold)):
        raise ValueError(f"threshold must be a finite number, got {guard.threshold!r}")
    if guard.n_states is not None and (not isinstance(guard.n_states, int) or guard.n_states < 1):
        raise ValueError(f"n_states must be a positive int or None, got {guard.n_states!r}")
    if guard.method not in METHODS:
        raise ValueError(f"unknown method {guard.method!r}: choose one of {', '.join(METHODS)}")
    if guard.rank is not None and not (isinstance(guard.rank, int) and guard.rank >= 1):
        raise ValueError(f"rank must be a positive int or None (all directions), got {guard.rank!r}")
    if guard.Cs is not None and (not len(guard.Cs) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) and c > 0 for c in guard.Cs)):
        raise ValueError(f"Cs must be positive, finite strengths to choose C from, got {guard.Cs!r}")
    if guard.C is not None and not (isinstance(guard.C, (int, float)) and float(guard.C) > 0):
        raise ValueError(f"C must be a positive number or None (chosen by cross-validation), got {guard.C!r}")
    if not isinstance(guard.scan_negatives, int) or isinstance(guard.scan_negatives, bool) or guard.scan_negatives < 0:
        raise ValueError(f"scan_negatives must be an int >= 0, got {guard.scan_negatives!r}")
    reads = check_reads(guard.reads)
    if not isinstance(guard.calibrate_max, bool):
        raise ValueError(f"calibrate_max must be True or False, got {guard.calibrate_max!r}")
    if guard.max_threshold not in MAX_THRESHOLDS:
        raise ValueError(f"max_threshold must be one of {MAX_THRESHOLDS}, got {guard.max_threshold!r}")
    if guard.calibrate_max and scan_width(reads[0]) is None:
        raise ValueError(f"calibrate_max calibrates the maximum over windows: it needs a scan:K read, not {reads}")
    budget = guard.sentence_budget
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < 1:
            raise ValueError(f"sentence_budget is a share of harmless prompts in [0, 1) or None, got {budget!r}")
        if sentence_width(reads[0]) is None:
            raise ValueError(f"sentence_budget sets the margin of a sent:K read's earlier sentence ends: use "
                             f"reads=['sent:K'] (not {reads})")
    if any(scan_width(r) is not None or sentence_width(r) is not None for r in reads):
        if len(reads) > 1:
            raise ValueError(f"a scan or sent read takes the highest of several windows and stands alone: use "
                             f"reads=[{reads[0]!r}] (not {reads})")
        if guard.method != "linear":
            raise ValueError(f"read {reads[0]!r} scores every window with a linear read-out: use method='linear'")
    return reads
