"""``pyvene-harm guard reply-fit``: the reply guard to ship, from a ``guard reply-set`` run, with a
threshold chosen on prompt sources it had not seen (:mod:`pyvene_harm.guard.reply_fit`)."""

from __future__ import annotations

from pathlib import Path

import click

from .guard_reply_crossval import hold_out_together_option, resolve_together
from .labelled import LazyModel
from .options import emit, model_options
from .tables import print_table

__all__ = ["reply_fit"]


@click.command("reply-fit")
@model_options
@click.option("--replies", "replies_dir", required=True, type=click.Path(file_okay=False),
              help="A `guard reply-set` run directory (with its units/). Example: --replies results/demo/reply-set")
@click.option("--design", default="16/16", show_default=True,
              help="STATES/WIDTH: states read and window width in tokens. The default is the demo model's "
                   "shipped design (chosen in results/demo/reply-crossval-wide); for another model, choose with "
                   "`guard reply-crossval` (the state index depends on the model's depth).")
@click.option("--min-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows ending before this reply token do not count towards the verdict.")
@click.option("--max-safe-flagged", type=click.FloatRange(0, 1, max_open=True), default=0.02, show_default=True,
              help="Threshold: the lowest that flags at most this share of safe replies scored by fits that left "
                   "their prompt source out.")
@click.option("--balance", type=click.Choice(["kind", "none"]), default="kind", show_default=True,
              help="kind: harmful replies, refusals and replies to harmless prompts weigh as kinds, not by count.")
@hold_out_together_option
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for reply_guard.{json,safetensors} (what `serve --reply-guard` loads).")
@click.option("--json", "as_json", is_flag=True, help="Print the out-of-fold report to stdout.")
def reply_fit(mopts, replies_dir, design, min_tokens, max_safe_flagged, balance, together, out, as_json):
    """Fit a reply guard on every source of a reply set; threshold from held-out sources.

    \b
    Example:
      pyvene-harm guard reply-fit -m demo --replies results/demo/reply-set-wide \\
        -o runs/reply-guard
    """
    from ..guard.reply_crossval import parse_reply_design
    from ..guard.reply_fit import fit_reply_guard
    from ..guard.reply_states import reply_token_states
    from .guard_reply_set import load_reply_rows

    try:
        parsed = parse_reply_design(design)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--design") from None
    if parsed.control:
        raise click.BadParameter("a text control reads no states and cannot be served: give STATES/WIDTH, "
                                 "e.g. 12/32", param_hint="--design")
    rows = [r for r in load_reply_rows(replies_dir) if r.reply.strip()]  # an empty reply has no tokens
    groups = resolve_together(together, [r.source for r in rows], [r.label for r in rows])
    loaded, fmt = LazyModel(mopts)()
    x = reply_token_states(loaded.model, fmt, [r.prompt for r in rows], [r.reply for r in rows],
                           states=parsed.states, batch_size=mopts.batch_size, progress=f"reading {len(rows)} replies")
    try:
        guard, report = fit_reply_guard([r.source for r in rows], [r.label for r in rows], [r.kind for r in rows], x,
                                        states=parsed.states, width=parsed.width, min_tokens=min_tokens,
                                        max_safe_flagged=max_safe_flagged, balance=balance, together=groups,
                                        model=loaded.model,
                                        tokenizer=loaded.tokenizer, formatter=fmt)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    guard.extra_ = {**report, "replies": str(replies_dir), "design": design}
    guard.save(out)
    o = report["out_of_fold"]
    print_table(f"reply guard {design}, out of fold at threshold {o['threshold']:+.3f}",
                ["harmful flagged", "safe flagged", "harmless cut short", "refusals flagged", "median delay",
                 "AUROC"],
                [[f"{o['harmful_flagged']}/{o['harmful']}", f"{o['safe_flagged']}/{o['safe']}",
                  f"{o['harmless_cut_short']}/{o['harmless']}", f"{o['refusals_flagged']}/{o['refusals']}",
                  str(o["median_delay"]), f"{o['auroc']:.3f}"]])
    click.echo(f"wrote {out}", err=True)
    emit(guard.extra_, as_json)
