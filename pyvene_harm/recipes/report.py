"""``pyvene-harm report``: a run directory as a Markdown summary (tables and figures)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from ..io_utils import atomic_write_bytes, read_json

__all__ = ["render_report", "report"]

MAX_TABLE_ROWS = 30


def render_report(run_dir: str | Path) -> str:
    """Markdown for one run directory: its command, options, results, small tables and plots."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ValueError(f"{run} is not a run directory (no config.json): pass the --out folder of a recipe")
    config = read_json(run / "config.json")
    lines = [f"# `{config['command']}` run: {run.name}", ""]
    opts = config.get("options", {})
    lines += ["## Options", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(opts.items())]
    versions = config.get("versions", {})
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), ""]
    results_path = run / "results.json"
    if not results_path.is_file():
        lines += ["", "**The run has not finished: no results.json yet.**", ""]
    else:
        results = read_json(results_path)
        scalars = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        if scalars:
            lines += ["", "## Results", "", "| result | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(scalars.items())]
    for path in sorted(run.glob("*.csv")):
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            continue
        header, body = rows[0], rows[1:]
        lines += ["", f"## {path.stem}", ""]
        if len(body) > MAX_TABLE_ROWS or any(len(c) > 80 for r in body for c in r):
            lines.append(f"[{path.name}]({path.name}): {len(body)} rows.")
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    figures = sorted(run.glob("*.png"))
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run_dirs):
    """Write summary.md into each RUN_DIR (tables from its CSVs, its PNG figures).

    \b
    Example:
      pyvene-harm report runs/extract runs/elicit
    """
    for run in run_dirs:
        try:
            text = render_report(run)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="RUN_DIRS") from None
        atomic_write_bytes(run / "summary.md", text.encode())
        click.echo(str(run / "summary.md"))
