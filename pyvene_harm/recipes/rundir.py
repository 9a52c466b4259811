"""Run directories: config.json, results.json, CSV tables, PNG plots, resumable units.

A recipe opens a :class:`RunDir` with its full configuration. If the folder already holds a
run with a different configuration, it refuses before any model is loaded; if it holds the
same configuration, finished units are read back instead of recomputed (resume). The config
also records a fingerprint of every prompt file its options name (``inputs``): a file edited
between a run and its resumption would otherwise mix old units with new prompts.

CSV cells that a spreadsheet would run as a formula (text starting with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return) are written with a leading ``'``: prompts are untrusted text.

Under a multi-rank launch only rank 0 touches the folder: it decides what is stored and
shares that (and each unit's value) with the other ranks, so all ranks take the same path.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from ..distributed import is_main, on_main
from ..io_utils import (
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    load_tensors,
    read_json,
)
from ..versions import library_versions

__all__ = ["RunDir", "RunDirConflict"]

# keys that may differ between an interrupted run and its resumption
_VOLATILE = {"versions", "platform", "command_line", "resume"}


class RunDirConflict(click.UsageError):
    """The output directory holds a different run (a usage error: exit code 2)."""


class RunDir:
    """One recipe run's folder.

    Args:
        path: the folder (created if needed).
        command: the recipe's name.
        options: every option that decides the numbers (seed included).
        free: options that may differ from a stored run's because no unit depends on them
            (e.g. the designs ``guard crossval`` fits on stored states): the run resumes and
            its config is rewritten.
    """

    def __init__(self, path: str | os.PathLike, command: str, options: dict[str, Any],
                 free: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.config = {"command": command, "options": _plain(options), "inputs": input_fingerprints(options),
                       "versions": library_versions(), "platform": platform.platform()}
        self._free = set(free)
        on_main(self._open)

    def _open(self) -> None:
        cfg = self.path / "config.json"
        if cfg.exists():
            old = read_json(cfg)
            changed = [f for f, digest in (old.get("inputs") or {}).items()
                       if f in self.config["inputs"] and self.config["inputs"][f] != digest]
            if changed:
                raise RunDirConflict(
                    f"{self.path} was run on another version of {changed[0]} (its content changed since: "
                    f"{len(changed)} file(s) differ): restore the file, or choose another --out folder")
            diffs = _differences(old, self.config, self._free)
            if diffs:
                raise RunDirConflict(
                    f"{self.path} holds a different run ({'; '.join(diffs[:3])}): "
                    "choose another --out folder or delete this one"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "units").mkdir(exist_ok=True)
        atomic_write_json(cfg, self.config)

    # --- resumable units -----------------------------------------------------------------

    def unit(self, name: str, compute: Callable[[], Any]) -> Any:
        """Result of ``compute()``, stored as JSON under ``units/``; read back when present."""
        path = self.path / "units" / f"{_safe(name)}.json"
        stored = on_main(lambda: (True, read_json(path)["value"]) if path.exists() else (False, None))
        if stored[0]:
            return stored[1]
        value = _plain(compute())

        def write() -> Any:
            atomic_write_json(path, {"value": value})
            return value

        return on_main(write)  # every rank continues with what rank 0 stored

    def tensor_unit(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Like :meth:`unit` for a dict of tensors (e.g. hidden states), stored as safetensors."""
        path = self.path / "units" / f"{_safe(name)}.safetensors"
        stored = on_main(lambda: load_tensors(path) if path.exists() else None)
        if stored is not None:
            return stored
        value = compute()
        if self.writes:
            atomic_save_tensors(path, value)
        return value

    def has_unit(self, name: str) -> bool:
        return on_main((self.path / "units" / f"{_safe(name)}.json").exists)

    def read(self, load: Callable[[Path], Any]) -> Any:
        """``load(folder)`` on rank 0 only, its result shared: e.g. a stored artifact, or None."""
        return on_main(lambda: load(self.path))

    @property
    def writes(self) -> bool:
        """Whether this process writes the folder (rank 0, or the only process)."""
        return is_main()

    # --- outputs -------------------------------------------------------------------------

    def write_results(self, results: dict[str, Any]) -> Path:
        path = self.path / "results.json"
        if self.writes:
            atomic_write_json(path, _plain(results))
        return path

    def write_csv(self, name: str, rows: Sequence[dict[str, Any]]) -> Path:
        path = self.path / f"{name}.csv"
        if not self.writes:
            return path
        buf = io.StringIO()
        fields: list[str] = []
        for row in rows:
            fields.extend(k for k in row if k not in fields)
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        atomic_write_bytes(path, buf.getvalue().encode())
        return path

    def save_figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as PNG (atomically) and close it."""
        import matplotlib.pyplot as plt

        path = self.path / f"{name}.png"
        if not self.writes:
            plt.close(fig)
            return path
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str) and v.startswith(_FORMULA_START) and not _is_number(v):
        return "'" + v  # a spreadsheet would run it as a formula
    return v


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def input_fingerprints(options: dict[str, Any]) -> dict[str, str]:
    """``{file: sha256[:16]}`` of every prompt file the options name: a path, a ``NAME=FILE``
    or ``NAME=FILE:LABEL`` spec, a folder or glob of prompt files, or a list of those."""
    from ..data import PROMPT_SUFFIXES

    found: dict[str, str] = {}

    def files_of(text: str) -> list[str]:
        path = Path(text).expanduser()
        if path.is_file():
            return [text] if path.suffix.lower() in PROMPT_SUFFIXES else []
        if path.is_dir():
            return sorted(str(f) for f in path.iterdir() if f.suffix.lower() in PROMPT_SUFFIXES and f.is_file())
        if any(c in text for c in "*?["):
            return sorted(f for f in glob.glob(str(path)) if Path(f).suffix.lower() in PROMPT_SUFFIXES)
        return []

    def visit(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, str) and v and len(v) < 4096 and "\n" not in v:  # a path, not a wrapper text
            tail = v.split("=", 1)[1] if "=" in v else v
            for text in {v, tail, tail.rsplit(":", 1)[0], *tail.split("+")}:
                for f in files_of(text):
                    if f not in found:
                        found[f] = file_sha256(f)[:16]

    visit(options)
    return dict(sorted(found.items()))


def _plain(obj: Any) -> Any:
    """JSON-ready copy (tensors to lists, paths to str, tuples to lists)."""
    return json.loads(json.dumps(obj, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (Path, set, frozenset)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else str(obj)
    return str(obj)


def _differences(old: dict, new: dict, free: set[str] = frozenset()) -> list[str]:
    diffs = []
    if old.get("command") != new.get("command"):
        diffs.append(f"command {old.get('command')!r} vs {new.get('command')!r}")
    a, b = old.get("options", {}), new.get("options", {})
    for k in sorted(set(a) | set(b)):
        if k in _VOLATILE or k in free:
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)!r} vs {b.get(k)!r}")
    return diffs
