"""``pyvene-harm guard reply-decide``: the declared rule of ``docs/reply-guard-choice.md`` applied
to a finished ``guard reply-crossval`` run, written beside it as ``decision.json``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import emit
from .tables import print_table

__all__ = ["reply_decide"]


@click.command("reply-decide")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--candidate", "candidates", multiple=True, required=True,
              help="A state design that may ship, repeatable. Example: --candidate s19/w16")
@click.option("--control", default="ngram", show_default=True,
              help="The text control a candidate must not fall behind on any (source, class) row.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.02, show_default=True,
              help="AUROC a candidate may fall below the control on one row.")
@click.option("--order", type=click.Choice(["check-first", "choose-first"]), default="check-first",
              show_default=True,
              help="check-first: the best candidate among those that pass the check (the fourth run's rule); "
                   "choose-first: the best candidate, shipped only if it passes (the third run's).")
@click.option("--refusal-rows", type=click.Choice(["gate", "report"]), default="gate", show_default=True,
              help="gate: every row can fail a candidate (the first four rules); report: rows of refusals "
                   "(safe replies to harmful prompts, read from the run's reply set) are reported but do not "
                   "gate (the fifth rule: a flagged refusal is replaced by the refusal).")
@click.option("--output", "output", default="decision.json", show_default=True,
              help="File name in RUN for the decision (a later rule applied to a run keeps the earlier one's).")
@click.option("--json", "as_json", is_flag=True, help="Print decision.json to stdout.")
def reply_decide(run, candidates, control, tolerance, order, refusal_rows, output, as_json):
    """Pick a reply-guard design by the declared rule, from RUN's crossval.csv and results.json.

    \b
    A candidate passes when on every held-out (source, class) row its AUROC is at least the
    control's minus --tolerance (rows of refusals excepted with --refusal-rows report) and its
    pooled AUROC is above the control's; candidates are ranked by their worst row over every row
    (ties: the higher pooled AUROC). Writes RUN/decision.json.

    \b
    Example:
      pyvene-harm guard reply-decide results/demo-1.5b/reply-crossval-3 \\
          --candidate s14/w16 --candidate s19/w16 --candidate s22/w16
    """
    from ..guard.reply_decision import declared_reply_choice, read_reply_crossval
    from ..guard.reply_decision import refusal_rows as read_refusal_rows
    from ..io_utils import atomic_write_json

    try:
        command = json.loads((run / "config.json").read_text(encoding="utf-8")).get("command")
        rows, pooled = read_reply_crossval(run)
        exempt = sorted(read_refusal_rows(run) & set(rows.get(control, ()))) if refusal_rows == "report" else []
    except (OSError, ValueError, KeyError) as err:
        raise click.UsageError(f"cannot read {run} as a finished `guard reply-crossval` run ({err}): give its "
                               "folder (config.json, results.json, crossval.csv)") from None
    if command != "guard-reply-crossval":
        raise click.UsageError(f"{run} is a {command!r} run, not a guard reply-crossval: the rule reads held-out "
                               "reply AUROCs")
    try:
        winner, standings = declared_reply_choice(rows, pooled, candidates, control=control, tolerance=tolerance,
                                                  order=order, exempt=exempt)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    decision = {"run": str(run), "control": control, "tolerance": tolerance, "order": order,
                "refusal_rows": refusal_rows, "rows_not_gating": exempt, "candidates": list(candidates), "control_pooled": pooled[control], "winner": winner,
                "standings": [s.as_dict() for s in standings]}
    if Path(output).name != output or not output.endswith(".json"):
        raise click.BadParameter(f"{output!r} is not a .json file name: give a name such as decision-fifth.json, "
                                 "written inside RUN", param_hint="--output")
    atomic_write_json(run / output, decision)
    print_table(f"declared rule against {control} (tolerance {tolerance:g}, {order})",
                ["design", "worst row", "pooled", "passes", "behind the control", "behind, not gating"],
                [[s.design, f"{s.worst:.3f} ({s.worst_row})", f"{s.pooled:.3f}", "yes" if s.passes else "no",
                  "; ".join(s.behind + (["pooled not above"] if s.pooled_not_above else [])) or "-",
                  "; ".join(s.behind_not_gating) or "-"]
                 for s in standings])
    click.echo(f"chosen: {winner}" if winner else "no candidate may ship", err=True)
    emit(decision, as_json)
