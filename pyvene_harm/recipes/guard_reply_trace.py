"""``pyvene-harm guard reply-trace``: the reply guard's score and the model's Delta_harmful token by
token along every reply of a ``guard reply-set`` run (:mod:`pyvene_harm.guard.reply_trace`).

The reply guard's scores are out of fold, as its threshold was chosen: each reply is scored by a
fit of the shipped design (states, window, weighting, groups) that left its prompt source out, so
no plotted reply was in the fit that scores it.
"""

from __future__ import annotations

import random
from pathlib import Path

import click

from .labelled import LazyModel
from .options import emit, model_options
from .rundir import RunDir
from .tables import print_table

__all__ = ["reply_trace"]

GROUPS = (("harmful", ("ablated", "accepted"), "tab:red"), ("refusal", ("refusal",), "tab:green"),
          ("harmless", ("harmless",), "tab:blue"))


@click.command("reply-trace")
@model_options
@click.option("--replies", "replies_dir", required=True, type=click.Path(file_okay=False),
              help="A `guard reply-set` run directory (with its units/). Example: --replies results/demo/reply-set-wide-ml")
@click.option("--reply-guard", "reply_guard_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A `guard reply-fit` folder: its design and threshold are used. "
                   "Example: --reply-guard artifacts/qwen2.5-coder-0.5b-instruct/reply-guard")
@click.option("--directions", "directions_path", required=True,
              help="DirectionSet whose harmful/harmless centroids give Delta_harmful. "
                   "Example: --directions artifacts/qwen2.5-coder-0.5b-instruct/directions")
@click.option("--layers", default=None, help="States Delta_harmful is averaged over, e.g. 8,12,16 (default: all).")
@click.option("--plot", "n_plot", type=click.IntRange(min=1), default=3, show_default=True,
              help="Replies plotted per group (harmful, refusal, harmless), drawn with --seed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the plotted replies.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (config.json, results.json, replies.csv, traces.csv, trace.png).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def reply_trace(mopts, replies_dir, reply_guard_dir, directions_path, layers, n_plot, seed, out, as_json):
    """Reply guard score and Delta_harmful at every reply token, with a plot and whole-set figures.

    \b
    Example:
      pyvene-harm guard reply-trace -m demo --replies results/demo/reply-set-wide-ml \\
        --reply-guard artifacts/qwen2.5-coder-0.5b-instruct/reply-guard \\
        --directions artifacts/qwen2.5-coder-0.5b-instruct/directions -o runs/reply-trace
    """
    import numpy as np

    from ..beliefs import resolve_layers
    from ..guard.features import check_fits_model
    from ..guard.reply import ReplyGuard, scored_ends
    from ..guard.reply_fit import kind_weights, out_of_fold_token_scores
    from ..guard.reply_set import public_row
    from ..guard.reply_trace import reply_belief_traces, trace_summary
    from .beliefs import resolve_directions
    from .guard_reply_set import load_reply_rows

    try:
        layer_list = None if layers is None else [int(v) for v in layers.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{layers!r} is not a list of state indices, e.g. 8,12,16",
                                 param_hint="--layers") from None
    rows = [r for r in load_reply_rows(replies_dir) if r.reply.strip()]  # an empty reply has no tokens
    try:
        guard = ReplyGuard.load(reply_guard_dir)
    except (OSError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--reply-guard") from None
    directions = resolve_directions(directions_path)
    try:  # before the model loads: a wrong --layers costs nothing
        resolve_layers(directions, layer_list)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--layers") from None
    extra = dict(getattr(guard, "extra_", {}) or {})
    together = [g.split("+") for g in extra.get("held_out_together", [])]
    run = RunDir(out, "guard-reply-trace", {**mopts.as_dict(), "replies": replies_dir, "reply_guard": reply_guard_dir,
                                            "directions": directions_path, "layers": layer_list, "plot": n_plot,
                                            "seed": seed})
    loaded, fmt = LazyModel(mopts)()
    try:  # a reply guard made for another model would lend this one its threshold
        check_fits_model(guard.metadata_, guard.hidden_size_, guard.states_, loaded.model, fmt)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--reply-guard") from None
    deltas, x = reply_belief_traces(loaded.model, fmt, [r.prompt for r in rows], [r.reply for r in rows], directions,
                                    layers=layer_list, keep=guard.states_, batch_size=mopts.batch_size,
                                    progress=f"reading {len(rows)} replies")
    y = [r.label for r in rows]
    kinds = [r.kind for r in rows]
    weights = kind_weights(kinds, y) if extra.get("balance", "kind") == "kind" else None
    scores = out_of_fold_token_scores([r.source for r in rows], y, x, states=tuple(guard.states_),
                                      width=int(guard.width), min_tokens=int(guard.min_tokens), weights=weights,
                                      together=together)
    scores = [s - guard.threshold_ for s in scores]
    summary = trace_summary(y, kinds, deltas, scores)

    table = []
    for r, d, s in zip(rows, deltas, scores):
        ends = scored_ends(len(s), int(guard.min_tokens))
        hit = np.flatnonzero(s[ends] > 0)
        pub = public_row(r)
        table.append({"source": r.source, "kind": r.kind, "label": r.label, "reply_sha": pub["reply_sha"],
                      "tokens": len(d), "delta_mean": float(d.mean()), "delta_first": float(d[0]),
                      "delta_last": float(d[-1]), "guard_max": float(s[ends].max()) if len(ends) else None,
                      "guard_first_flagged": int(ends[hit[0]]) if len(hit) else None})
    run.write_csv("replies", table)
    rng = random.Random(seed)
    picked = {name: rng.sample([i for i, r in enumerate(rows) if r.kind in ks], min(n_plot, sum(r.kind in ks
                                                                                               for r in rows)))
              for name, ks, _ in GROUPS}
    run.write_csv("traces", [{"group": name, "reply_sha": table[i]["reply_sha"], "source": rows[i].source,
                              "token": t, "reply_guard": float(scores[i][t]), "delta_harmful": float(deltas[i][t])}
                             for name, ks, _ in GROUPS for i in picked[name] for t in range(len(deltas[i]))])
    run.save_figure(_plot(picked, scores, deltas, int(guard.min_tokens)), "trace")
    caught = sum(1 for row in table if row["label"] and row["guard_first_flagged"] is not None)
    own = extra.get("out_of_fold", {})
    results = {"replies": replies_dir, "reply_guard": reply_guard_dir, "threshold": guard.threshold_,
               "harmful_flagged": caught,
               # the same folds, weights and threshold as `guard reply-fit`: its own count must come back
               "matches_the_guard_report": (caught == own.get("harmful_flagged")
                                            if str(extra.get("replies")) == str(replies_dir) and own else None),
               "scores": "out of fold: each reply scored by the shipped design fitted without its prompt source"
                         + (" (grouped: " + ", ".join(extra["held_out_together"]) + ")" if together else ""),
               **summary}
    run.write_results(results)
    print_table("Delta_harmful along the reply (mean over its tokens), per kind",
                ["kind", "n", "first token", "mean", "last token"],
                [[k, str(v["n"]), f"{v['first_token']:+.4f}", f"{v['mean']:+.4f}", f"{v['last_token']:+.4f}"]
                 for k, v in summary["per_kind"].items()])
    emit(results, as_json)


def _plot(picked, scores, deltas, min_tokens: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name, _, colour in GROUPS:
        for j, i in enumerate(picked[name]):
            label = name if j == 0 else None
            top.plot(scores[i], color=colour, alpha=0.8, label=label)
            bottom.plot(deltas[i], color=colour, alpha=0.8, label=label)
    top.axhline(0, color="black", lw=0.8, ls="--")
    top.axvline(min_tokens - 1, color="grey", lw=0.8, ls=":")
    top.set_ylabel("reply guard score - threshold\n(out of fold; > 0 stops the reply)")
    bottom.axhline(0, color="black", lw=0.8, ls="--")
    bottom.set_ylabel("Delta_harmful at the token")
    bottom.set_xlabel("reply token")
    top.legend(loc="upper right")
    top.set_title("Along each reply: the reply guard and the model's harmfulness belief")
    return fig
