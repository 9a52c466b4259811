"""The README's quickstarts run as written, on the demo model, so that they cannot rot.

The Python quickstart's block and the CLI quickstart's block are taken from README.md as they
stand and run in a scratch folder laid out like the repository (``artifacts/`` and
``pyvene_harm/prompts/`` beside it, ``../shared/data`` above it), so a user's own ``runs/`` and
``my-directions/`` are left alone. The Python block's printed predictions must be the ones its
comments state. Slow: a few minutes on a 2-core CPU (the README gives each block's time).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, demo_installed

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not demo_installed(), reason="demo extra not installed"),
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"prompt sets not found at {SHARED_DATA}"),
]


def block(heading: str, language: str) -> str:
    """The first ``language`` code block after ``heading``."""
    start = README.index(heading)
    fence = f"```{language}\n"
    at = README.index(fence, start) + len(fence)
    return README[at:README.index("```", at)]


@pytest.fixture()
def scratch(tmp_path: Path) -> Path:
    """``tmp/work`` with the repository's artifacts and prompts, and ``tmp/shared/data``."""
    work = tmp_path / "work"
    (work / "pyvene_harm").mkdir(parents=True)
    (work / "artifacts").symlink_to(ROOT / "artifacts")
    (work / "pyvene_harm" / "prompts").symlink_to(ROOT / "pyvene_harm" / "prompts")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    return work


def run(cmd: list[str], cwd: Path) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "PYTHONPATH": str(ROOT),
                            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert r.returncode == 0, f"{cmd[:2]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_the_python_quickstart_prints_what_its_comments_say(scratch):
    code = block("## Python quickstart", "python")
    out = run([sys.executable, "-c", code], scratch)
    promised = re.findall(r"#\s*(\[[0-9 ]+\])", code)
    assert promised, "the quickstart's comments no longer state the guards' predictions"
    printed = re.findall(r"^(\[[0-9 ]+\])$", out, re.M)
    assert printed == promised, out
    assert (scratch / "my-directions" / "directions.json").is_file()


def test_the_cli_quickstart_runs_as_written(scratch):
    script = block("## CLI quickstart", "bash")
    run(["bash", "-euo", "pipefail", "-c", script], scratch)
    runs = scratch / "runs"
    for folder in ("extract", "elicit", "crossval", "guarded"):  # run directories
        assert (runs / folder / "config.json").is_file() and (runs / folder / "results.json").is_file(), folder
    for folder in ("guard", "guard-linear", "guard-mined", "guard-site"):  # guard artifacts
        assert {p.name for p in (runs / folder).iterdir()} == {"guard.json", "guard.safetensors"}, folder
    assert (runs / "extract" / "summary.md").is_file() and (runs / "elicit" / "summary.md").is_file()
