"""scripts/crossval_flips.py without a run: which rows count as judged differently."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crossval_flips.py"


def test_rows_differ_where_some_design_flags_and_another_does_not():
    spec = importlib.util.spec_from_file_location("crossval_flips", SCRIPT)
    flips = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flips)
    decisions = {"a": np.array([1.0, -1.0, 0.5, -0.2, 0.0]), "b": np.array([2.0, 0.3, -0.5, -0.1, 0.0]),
                 "c": np.array([0.1, 0.2, 0.4, -3.0, 0.0])}
    # row 0 all flag, row 3 none, row 4 none (a decision of 0 is not a flag); rows 1 and 2 differ
    assert flips.differing(decisions) == [1, 2]
    assert flips.differing({"only": np.array([1.0, -1.0])}) == []
