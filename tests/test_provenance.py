"""Every published run names the artifacts it used, and they are still the ones it used.

A run's config.json is the command that reproduces it; a guard or directions folder it names must
exist in this repository (not a private runs/ folder), and a guard must still have the content
fingerprint the run recorded, or re-running the config would silently score another guard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyvene_harm.recipes.guard_common import guard_fingerprint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("results/**/config.json"))


def _folders(options: dict) -> list[tuple[str, str]]:
    out = [(k, options[k]) for k in ("guard", "directions") if isinstance(options.get(k), str)]
    out += [("exclude", e) for e in options.get("exclude") or [] if not e.startswith("../shared")]
    return out


def test_there_are_published_runs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.parent.relative_to(ROOT)) for c in CONFIGS])
def test_published_run_names_artifacts_that_exist_and_match(config):
    options = json.loads(config.read_text())["options"]
    for key, folder in _folders(options):
        path = ROOT / folder
        assert path.is_dir(), f"{config}: {key} {folder!r} is not a folder in this repository"
        if key == "directions":
            assert (path / "directions.json").is_file() or (path / "directions" / "directions.json").is_file(), folder
        if key == "guard":
            assert guard_fingerprint(str(path)) == options["guard_fingerprint"], (
                f"{config}: {folder} no longer holds the guard this run used")
