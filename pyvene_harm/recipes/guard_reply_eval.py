"""``pyvene-harm guard reply-eval``: a fitted reply guard, as it is (its own threshold), on the
labelled replies of a ``guard reply-set`` run: what it would catch and cut at that threshold, per
prompt source, beside the ranking figures (:func:`~pyvene_harm.guard.reply_fit.report_at_threshold`).

Where the replies are the ones the guard was fitted on (its ``extra.replies``), the figures are
in-sample and the run says so; held-out figures come from ``guard reply-crossval`` or from a reply
set drawn apart (``guard reply-set --exclude``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from .labelled import LazyModel
from .options import emit, model_options
from .rundir import RunDir
from .tables import print_table

__all__ = ["reply_eval"]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@click.command("reply-eval")
@model_options
@click.option("--reply-guard", "reply_guard_dir", required=True, type=click.Path(file_okay=False),
              help="A `guard reply-fit` folder. Example: --reply-guard artifacts/qwen2.5-coder-0.5b-instruct/reply-guard")
@click.option("--replies", "replies_dir", required=True, type=click.Path(file_okay=False),
              help="A `guard reply-set` run directory (with its units/). Example: --replies results/demo/reply-set")
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True,
              help="Run folder: config.json, results.json, eval.csv (per source and class), scores.csv (per reply: "
                   "hashes and scores, no texts).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def reply_eval(mopts, reply_guard_dir, replies_dir, out, as_json):
    """A reply guard at its own threshold on a labelled reply set.

    \b
    Example:
      pyvene-harm guard reply-eval -m demo --reply-guard artifacts/qwen2.5-coder-0.5b-instruct/reply-guard \\
        --replies results/demo/reply-set -o runs/reply-eval
    """
    import numpy as np

    from ..guard.metrics import against_other_class
    from ..guard.reply import ReplyGuard
    from ..guard.reply_fit import report_at_threshold
    from ..guard.reply_states import reply_token_states
    from .guard_reply_set import load_reply_rows

    rows = [r for r in load_reply_rows(replies_dir) if r.reply.strip()]  # an empty reply has no tokens
    if len({r.label for r in rows}) < 2:
        raise click.UsageError(f"{replies_dir} holds replies of one class only: a reply guard is judged on harmful "
                               "and safe replies together")
    loaded, fmt = LazyModel(mopts)()
    try:  # before the run folder exists: a bad guard leaves nothing behind
        guard = ReplyGuard.load(reply_guard_dir, loaded.model, loaded.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--reply-guard") from None
    run = RunDir(out, "guard-reply-eval", {**mopts.as_dict(), "reply_guard": reply_guard_dir, "replies": replies_dir})
    x = reply_token_states(loaded.model, fmt, [r.prompt for r in rows], [r.reply for r in rows],
                           states=list(guard.states_), batch_size=mopts.batch_size,
                           progress=f"reading {len(rows)} replies")
    scores = guard.token_scores(x)
    y = np.asarray([r.label for r in rows])
    sources, kinds = [r.source for r in rows], [r.kind for r in rows]
    report = report_at_threshold(scores, y, kinds, sources, guard.threshold_, guard.min_tokens)
    verdict = guard.decision_function(x)  # minus the threshold: flagged above 0, a non-finite score flagged
    src = np.asarray(sources, dtype=object)
    flags = {(p["source"], p["class"]): p["flagged"] for p in report["per_source"]}
    per_row = []
    for name in sorted(set(sources)):
        for lab in (1, 0):
            own = verdict[(src == name) & (y == lab)]
            if len(own):
                m = against_other_class(lab, own, verdict[y == 1 - lab], n_boot=300)
                per_row.append({"source": name, "class": "harmful" if lab else "safe",
                                "flagged": flags[(name, "harmful" if lab else "safe")],
                                **{k: v for k, v in m.items() if k != "ci"}})
    fitted_on = (getattr(guard, "extra_", None) or {}).get("replies")
    in_sample = fitted_on is not None and Path(fitted_on).resolve() == Path(replies_dir).resolve()
    run.write_csv("eval", per_row)
    run.write_csv("scores", [{"source": r.source, "kind": r.kind, "label": r.label, "prompt_sha": _sha(r.prompt),
                              "reply_sha": _sha(r.reply), "score": float(v), "flagged_at": f}
                             for r, v, f in zip(rows, verdict, guard.first_flagged(x))])
    results = {"reply_guard": reply_guard_dir, "replies": replies_dir, "n": len(rows), "in_sample": in_sample,
               **report}
    run.write_results(results)
    if in_sample:
        click.echo(f"note: {reply_guard_dir} was fitted on these replies ({fitted_on}): the figures are in-sample, "
                   "not held out", err=True)
    print_table(f"reply guard at its threshold {guard.threshold_:+.3f}",
                ["harmful caught", "safe flagged", "harmless cut short", "refusals flagged", "median delay", "AUROC"],
                [[f"{report['harmful_flagged']}/{report['harmful']}", f"{report['safe_flagged']}/{report['safe']}",
                  f"{report['harmless_cut_short']}/{report['harmless']}",
                  f"{report['refusals_flagged']}/{report['refusals']}", str(report["median_delay"]),
                  "-" if report["auroc"] is None else f"{report['auroc']:.3f}"]])
    emit(results, as_json)
