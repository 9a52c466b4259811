"""``pyvene-harm guard reply-crossval``: reply-guard designs against text controls, leaving
one prompt source of a ``guard reply-set`` run out at a time."""

from __future__ import annotations

from pathlib import Path

import click

from .labelled import LazyModel
from .options import emit, model_options
from .rundir import RunDir
from .tables import print_table

__all__ = ["hold_out_together_option", "reply_crossval", "resolve_together"]

DEFAULT_DESIGNS = ("8/16", "12/16", "16/16", "12/8", "12/32", "8+12+16/16", "ngram", "length")


def hold_out_together_option(fn):
    """``--hold-out-together A,B``: prompt sources every fold leaves out as one unit."""
    return click.option(
        "--hold-out-together", "together", multiple=True, metavar="SOURCE,SOURCE[,...]",
        help="Sources a fold leaves out together, as one unseen unit (repeatable), e.g. the harmful and "
             "harmless requests of the same languages: --hold-out-together other-languages,other-languages-harmless. "
             "Figures are still given per source.")(fn)


def resolve_together(together: tuple[str, ...], sources: list[str], labels: list[int]) -> list[list[str]]:
    """The groups of ``--hold-out-together``, checked against the reply set's sources and labels
    before any model is loaded."""
    from ..guard.reply_fit import held_out_units

    groups = [[name.strip() for name in g.split(",") if name.strip()] for g in together]
    try:
        held_out_units(sources, groups, labels)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--hold-out-together") from None
    return groups


@click.command("reply-crossval")
@model_options
@click.option("--replies", "replies_dir", required=True, type=click.Path(file_okay=False),
              help="A `guard reply-set` run directory (with its units/). Example: --replies results/demo/reply-set")
@click.option("--design", "designs", multiple=True, default=DEFAULT_DESIGNS, show_default=True,
              help="STATES/WIDTH (states read, window width in tokens; e.g. 12/16, 8+12/32), ngram or length; "
                   "repeatable.")
@click.option("--min-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows ending before this reply token do not count towards the verdict.")
@click.option("--balance", type=click.Choice(["kind", "none"]), default="kind", show_default=True,
              help="kind: each fold weighs harmful replies, refusals and replies to harmless prompts as kinds, "
                   "not by count, as `guard reply-fit` fits the guard it ships.")
@hold_out_together_option
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (config.json, results.json, crossval.csv).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def reply_crossval(mopts, replies_dir, designs, min_tokens, balance, together, out, as_json):
    """Leave-one-source-out figures of reply-guard designs and the text controls.

    \b
    Example:
      pyvene-harm guard reply-crossval -m demo --replies results/demo/reply-set -o runs/reply-crossval
    """
    from ..guard.reply_crossval import cross_validate_replies, parse_reply_design
    from ..guard.reply_states import reply_token_states
    from .guard_reply_set import load_reply_rows

    try:
        parsed = [parse_reply_design(d) for d in designs]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--design") from None
    rows = load_reply_rows(replies_dir)
    rows = [r for r in rows if r.reply.strip()]  # an empty reply has no tokens to read
    groups = resolve_together(together, [r.source for r in rows], [r.label for r in rows])
    needed = sorted({s for d in parsed for s in d.states})
    run = RunDir(out, "guard-reply-crossval", {**mopts.as_dict(), "replies": replies_dir, "designs": list(designs),
                                               "min_tokens": min_tokens, "balance": balance,
                                               # only when given: earlier runs resume as they are
                                               **({"hold_out_together": groups} if groups else {})})
    states: dict[int, list] = {}
    if needed:
        loaded, fmt = LazyModel(mopts)()
        got = reply_token_states(loaded.model, fmt, [r.prompt for r in rows], [r.reply for r in rows],
                                 states=needed, batch_size=mopts.batch_size,
                                 progress=f"reading {len(rows)} replies")
        states = {s: [g[:, j] for g in got] for j, s in enumerate(needed)}
    res = cross_validate_replies([r.source for r in rows], [r.label for r in rows], [r.reply for r in rows],
                                 states, parsed, min_tokens=min_tokens, kinds=[r.kind for r in rows],
                                 balance=balance, together=groups,
                                 progress=lambda m: click.echo(m, err=True))
    run.write_csv("crossval", res["rows"])
    worst = {}
    for r in res["rows"]:
        worst[r["design"]] = min(worst.get(r["design"], 1.0), r["auroc"])
    results = {"replies": replies_dir, "n": len(rows), "min_source_auroc": worst,
               **({"held_out_together": ["+".join(g) for g in groups]} if groups else {}),
               "pooled": {k: {m: v[m] for m in ("auroc", "auprc", "f1", "fpr", "recall", "tpr_at_1pct_fpr")}
                          for k, v in res["pooled"].items() if v},
               "delay": res["delay"]}
    run.write_results(results)
    print_table("reply guard, held-out sources", ["design", "pooled AUROC", "worst source AUROC", "F1", "FPR",
                                                  "median delay", "safe cut"],
                [[d, f"{results['pooled'][d]['auroc']:.3f}", f"{worst[d]:.3f}", f"{results['pooled'][d]['f1']:.3f}",
                  f"{results['pooled'][d]['fpr']:.3f}",
                  str(res["delay"].get(d, {}).get("median_delay", "-")),
                  str(res["delay"].get(d, {}).get("safe_cut_short", "-"))] for d in results["pooled"]])
    emit(results, as_json)
