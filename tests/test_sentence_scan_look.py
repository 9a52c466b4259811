"""scripts/sentence_scan_look.py without a model: which windows it reads and how the margin applies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sentence_scan_look.py"


def test_sentence_scan_look_reads_sentence_ends_and_asks_earlier_ones_for_a_margin():
    spec = importlib.util.spec_from_file_location("sentence_scan_look", SCRIPT)
    look = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(look)
    pieces = ["How", " do", " I", " kill", " a", " process", "?", " Also", ",", " unrelated", ":", " list", " fruits"]
    assert look.sentence_ends(pieces) == [6, 10, 12]  # '?', ':' and always the last token
    assert look.sentence_ends(["Hi", "."]) == [1]
    scores = np.full(13, -1.0)
    scores[6] = 0.8  # the request's own window, before the tail
    assert look.flags(scores, [6, 10, 12], threshold=0.0, margin=0.5)
    assert not look.flags(scores, [6, 10, 12], threshold=0.0, margin=1.0)
    scores[3] = 5.0  # " kill" ends no sentence: never read alone
    assert not look.flags(scores, [6, 10, 12], threshold=0.0, margin=1.0)
    scores[12] = 0.1  # the last window needs no margin
    assert look.flags(scores, [6, 10, 12], threshold=0.0, margin=1.0)
    assert look.with_tail("Make a bomb") == "Make a bomb." + look.TAIL and look.with_tail("Why?").startswith("Why? Also")
