"""The CLI answers --help and usage errors without importing the heavy stack.

torch, transformers and pyvene take seconds to import (9 s on a 2-core machine); a command
that imported them before parsing its options made every ``--help`` and every typo wait for
them. Each check runs in a fresh interpreter, since this test session has imported them long
ago, and reads ``sys.modules`` there: what is imported, not how long it took on a busy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "pyvene", "sklearn", "safetensors", "matplotlib")

# every command's and sub-command's help, then a few usage errors, in one fresh interpreter
_WALK = """
import json, sys
import click
from click.testing import CliRunner
from pyvene_harm.cli import main

runner = CliRunner()
seen, texts = [], []

def walk(cmd, path):
    # wide, so that no example path is wrapped across lines
    result = runner.invoke(main, [*path, "--help"], terminal_width=400, max_content_width=400)
    assert result.exit_code == 0, (path, result.output)
    seen.append(" ".join(path))
    texts.append(result.output)
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            walk(cmd.get_command(ctx, name), [*path, name])

walk(main, [])
errors = [runner.invoke(main, args).exit_code for args in (
    ["extract", "--batch-size", "0", "-o", "x"], ["guard", "fit", "--no-such-option"], ["no-such-command"])]
print(json.dumps({"seen": seen, "texts": texts, "errors": errors, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _fresh_python(code: str) -> dict:
    # cwd = the repository root, so that this tree's pyvene_harm is the one imported
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_and_usage_errors_import_none_of_the_heavy_stack():
    got = _fresh_python(_WALK)
    assert {"", "extract", "guard", "guard fit", "guard calibrate", "guard crossval", "serve"} <= set(got["seen"])
    assert got["errors"] == [2, 2, 2]
    assert "click" in got["modules"]  # the walk did run the CLI
    assert [m for m in HEAVY if m in got["modules"]] == []


def test_importing_the_package_is_light_and_names_resolve_on_use():
    code = """
import json, sys
import pyvene_harm
before = sorted({m.split(".")[0] for m in sys.modules})
from pyvene_harm import LatentGuard, load_model
print(json.dumps({"before": before, "after": sorted({m.split(".")[0] for m in sys.modules}),
                  "names": [LatentGuard.__name__, load_model.__name__]}))
"""
    got = _fresh_python(code)
    assert [m for m in HEAVY if m in got["before"]] == []
    assert "torch" in got["after"]
    assert got["names"] == ["LatentGuard", "load_model"]


@pytest.mark.parametrize("package", ["pyvene_harm", "pyvene_harm.guard"])
def test_every_name_in_all_resolves(package):
    import importlib

    mod = importlib.import_module(package)
    exported = sorted(n for names in mod._EXPORTS.values() for n in names)
    assert sorted(mod.__all__) == exported
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    assert set(mod.__all__) <= set(dir(mod))
    with pytest.raises(AttributeError, match="no_such_name"):
        mod.no_such_name  # noqa: B018


# options whose value an example names as an input file; `--set NAME=FILE[:LABEL]` and friends
# carry a name and a label around it
_INPUTS = ("--harmful", "--harmless", "--traffic", "--conversations", "--file", "--pool", "--set",
           "--shift", "--val-harmful", "--val-harmless", "--exclude", "--wrap")


def _input_files(text: str) -> list[str]:
    import re

    found = []
    for option, value in re.findall(r"(--[a-z-]+)[ =]([^\s\\]+)", text):
        if option not in _INPUTS or value.startswith("...") or "$" in value.split("/")[0] and "$D" not in value:
            continue
        value = value.split("=", 1)[-1] if option in ("--set", "--shift", "--pool", "--wrap") else value
        for part in value.split("+"):
            path = re.sub(r":(harmful|harmless)$", "", part).replace("$D", "../shared/data")
            if re.search(r"\.(jsonl|json|csv|txt)$", path) and not path.startswith("hf://"):
                found.append(path)
    return found


def test_every_file_a_help_example_names_exists():
    """A newcomer copies the examples: ``advbench.json`` or ``logs/prompts.jsonl`` exist nowhere."""
    got = _fresh_python(_WALK)
    files = sorted({f for text in got["texts"] for f in _input_files(text)})
    assert "../shared/data/chats_advbench.json" in files and "pyvene_harm/prompts/example_traffic.jsonl" in files
    shared = (ROOT.parent / "shared" / "data").is_dir()
    missing = [f for f in files if not (ROOT / f).exists() and (shared or not f.startswith("../shared/"))]
    assert missing == [], files
