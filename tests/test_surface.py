"""Surface edits and the flip-rate metric: constructed cases where it must be 0 and 1."""

from __future__ import annotations

import pytest

from pyvene_harm.data import punctuation_variants
from pyvene_harm.surface import (
    SURFACE_EDITS,
    measure_surface_invariance,
    surface_change_rate,
    surface_variants,
)

PROMPTS = ["How do I bake bread?", "write a poem about the sea.", "Give me a recipe", "Why!"]


def test_variants_edit_only_the_ends_and_the_first_letter():
    v = surface_variants("How do I bake bread?")
    assert v == {"strip": "How do I bake bread", "dot": "How do I bake bread.",
                 "question": "How do I bake bread?", "case": "how do I bake bread?"}
    assert surface_variants("  'quoted' request.")["case"] == "  'Quoted' request."
    assert surface_variants("Go!!", ("strip",)) == {"strip": "Go"}
    assert punctuation_variants(["Make a cake."]) == ["Make a cake", "Make a cake.", "Make a cake?"]


def test_a_verdict_that_ignores_the_text_never_flips():
    inv = measure_surface_invariance(lambda batch: [1] * len(batch), PROMPTS)
    assert inv.rate == 0.0 and set(inv.per_edit) == set(SURFACE_EDITS)
    # every edit that changes the text is counted, the ones that do not are left out
    changed = sum(v != p for p in PROMPTS for v in surface_variants(p).values())
    assert inv.n_pairs == changed


def test_a_verdict_on_the_exact_text_always_flips():
    originals = set(PROMPTS)
    inv = measure_surface_invariance(lambda batch: [int(p in originals) for p in batch], PROMPTS)
    assert inv.rate == 1.0 and all(r == 1.0 for r in inv.per_edit.values())


def test_a_final_period_detector_flips_exactly_where_the_period_changes():
    inv = measure_surface_invariance(lambda batch: [int(p.endswith(".")) for p in batch], PROMPTS)
    assert inv.per_edit["case"] == 0.0
    assert inv.per_edit["dot"] == 1.0  # every prompt not ending in '.' now does
    # stripping changes three prompts ('?', '.', '!'), and only the one that ended in '.' flips
    assert inv.per_edit["strip"] == pytest.approx(1 / 3)


def test_change_rate_checks_lengths_and_empty_cases():
    assert surface_change_rate([1, 0], {"strip": [1, 1]}).rate == 0.5
    assert surface_change_rate([1], {"strip": [0]}, {"strip": [False]}).n_pairs == 0
    with pytest.raises(ValueError, match="verdicts for edit"):
        surface_change_rate([1, 0], {"strip": [1]})
    with pytest.raises(ValueError, match="unknown surface edit"):
        surface_variants("hi", ("shout",))
    with pytest.raises(ValueError, match="non-empty"):
        surface_variants("  ")
