"""``pyvene-harm guard decide``: the declared rule of ``docs/guard-choice.md`` applied to a
finished ``guard crossval`` run, written beside it as ``decision.json``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import emit
from .tables import print_table

__all__ = ["decide"]


@click.command("decide")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--reference", required=True, help="The design a candidate must not fall behind (the shipped one). "
                                                 "Example: --reference linear-last16-mined")
@click.option("--candidate", "candidates", multiple=True, required=True,
              help="A design that may replace it, repeatable. Example: --candidate scan16-cal")
@click.option("--margin", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Points a candidate may fall below the reference on its worst source, the pooled spelling "
                   "shifts and the other languages.")
@click.option("--tail-must-rise/--tail-may-fall", default=True, show_default=True,
              help="Veto a candidate whose accuracy on the tail shift (appended text) is not above the reference's.")
@click.option("--per-source", is_flag=True,
              help="Also veto a candidate more than --margin points below the reference on any one source or shift "
                   "source (the ninth decision's rule 4).")
@click.option("--json", "as_json", is_flag=True, help="Print decision.json to stdout.")
def decide(run, candidates, reference, margin, tail_must_rise, per_source, as_json):
    """Pick between guard designs by the declared rule, from RUN's results.json.

    \b
    Candidates are ranked by their worst leave-one-source-out accuracy (ties: the higher mean);
    a candidate is vetoed when its worst source, its accuracy pooled over the spelling shifts or its
    mean on the other languages is more than --margin points below the reference's, or its tail
    shift accuracy is not above it (with --per-source, or any one source is). Writes RUN/decision.json.

    \b
    Example:
      pyvene-harm guard decide results/demo/guard-scan-neg --reference linear-last16-mined \\
          --candidate scan16-neg8 --candidate scan16-neg16 --candidate scan32-neg16
    """
    from ..guard.decision_rule import declared_choice
    from ..io_utils import atomic_write_json

    path = run / "results.json"
    if not path.is_file():
        raise click.UsageError(f"{path} does not exist: give the folder of a finished `guard crossval` run")
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise click.UsageError(f"cannot read {run}'s config.json and results.json ({err}): re-run the crossval") from None
    if config.get("command") != "guard-crossval":
        raise click.UsageError(f"{run} is a {config.get('command')!r} run, not a guard crossval: the rule reads "
                               "leave-one-source-out accuracies")
    try:
        winner, standings = declared_choice(results, reference, candidates, margin=margin / 100,
                                            tail_must_rise=tail_must_rise, per_source=per_source)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    decision = {"run": str(run), "reference": reference, "candidates": list(candidates), "margin_points": margin,
                "tail_must_rise": tail_must_rise, "per_source": per_source, "winner": winner, "standings": [s.as_dict() for s in standings]}
    atomic_write_json(run / "decision.json", decision)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    print_table(f"declared rule against {reference} (margin {margin:g} points)",
                ["design", "worst source", "mean", "spelling", "other languages", "tail", "vetoed by"],
                [[s.design, f"{pct(s.worst)} ({s.worst_source})", pct(s.mean), pct(s.spelling),
                  pct(s.other_languages), pct(s.tail), "; ".join(v.split(" against")[0].split(" not above")[0] for v in s.vetoes) or ("reference" if i == 0 else "-")]
                 for i, s in enumerate(standings)])
    click.echo(f"chosen: {winner}" if winner else f"every candidate is vetoed: {reference} stays", err=True)
    emit(decision, as_json)
