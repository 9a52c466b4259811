"""``pyvene-harm guard refusal-fit``: the model's refusal belief, to report beside a guard's
harmfulness belief (:mod:`pyvene_harm.guard.refusal_read`).

Reads Delta_refuse at t_post_inst with a DirectionSet's refused / accepted centroids, at the
guard's own states (so serving costs no extra forward pass), and calibrates "the model would
refuse" on prompts labelled with the model's own refusals, e.g. the ``refused`` column of a
``guard eval --baseline`` run's predictions.csv (greedy replies + the keyword judge). Before the
final calibration on every labelled prompt, each group (prompt set) is scored by a calibration
fitted without it: those held-out figures go into the guard and onto the screen.
"""

from __future__ import annotations

from pathlib import Path

import click

from .guard_common import bind_model, guard_model_options, load_guard, resolve_model_options
from .options import emit
from .tables import print_table

__all__ = ["refusal_fit"]

_TRUE, _FALSE = {"1", "true", "yes", "refused"}, {"0", "false", "no", "accepted"}


@click.command("refusal-fit")
@click.option("--guard", "guard_path", required=True, help="Guard folder (from `guard fit`) or Hub repo id.")
@guard_model_options
@click.option("--directions", "directions_path", required=True,
              help="DirectionSet with refused / accepted centroids (from `extract`), of the guard's model.")
@click.option("--labels", "labels_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Prompts with the model's own refusals: a CSV/JSONL with prompt and refused columns, e.g. "
                   "results/demo/guard-eval-paper/predictions.csv.")
@click.option("--prompt-field", default="prompt", show_default=True, help="Column holding the prompt.")
@click.option("--refused-field", default="refused", show_default=True,
              help="Column holding whether the model refused (1/0, true/false).")
@click.option("--group-field", default="set", show_default=True,
              help="Column naming each prompt's set: held-out figures leave one set out at a time.")
@click.option("--states", "states_text", default=None,
              help="States to read Delta_refuse at, among the guard's (default: all of the guard's).")
@click.option("--method", type=click.Choice(["readout", "centroids"]), default="readout", show_default=True,
              help="What gives P(would refuse): a linear read-out of the t_post_inst states fitted on the labels, "
                   "or a logistic fit of Delta_refuse (the paper's centroid gap). Both are measured either way.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for refusal_read.{json,safetensors}: `serve --refusal-read` loads it beside the guard.")
@click.option("--json", "as_json", is_flag=True, help="Print the held-out figures as JSON to stdout.")
def refusal_fit(guard_path, model_args, directions_path, labels_path, prompt_field, refused_field, group_field,
                states_text, method, out, as_json):
    """Fit the model's refusal belief (Delta_refuse, P(would refuse)) to report beside a guard's verdicts.

    \b
    Example:
      pyvene-harm guard refusal-fit --guard artifacts/qwen2.5-coder-0.5b-instruct/guard \\
        --directions artifacts/qwen2.5-coder-0.5b-instruct/directions \\
        --labels results/demo/guard-eval-paper/predictions.csv -o runs/refusal-read
    """
    from ..data import load_records
    from ..guard.refusal_read import RefusalRead, held_out_refusal_figures, post_inst_states
    from ..io_utils import file_sha256
    from .beliefs import resolve_directions
    from .options import parse_layers

    try:
        rows = load_records(labels_path)
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint="--labels") from None
    prompts, refused, groups = _labelled(rows, prompt_field, refused_field, group_field, labels_path)
    g = load_guard(guard_path, model_args["revision"])
    directions = resolve_directions(directions_path)
    states = parse_layers(states_text) if states_text else list(g.states_)
    try:
        read = RefusalRead.from_directions(directions, states)
        g.set_refusal_read(read)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--states" if states_text else "--directions") from None
    mopts = resolve_model_options(model_args, g, guard_path)
    loaded = bind_model(g, mopts)
    try:
        directions.check_model(loaded.model, g.chat_formatter())
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--directions") from None
    x = post_inst_states(g, prompts, read.states, progress=f"reading {len(prompts)} prompts")
    delta = read.delta(x)
    figures = held_out_refusal_figures(delta, refused, groups, x)
    oof = figures.pop("readout_scores")
    source = {"labels": str(labels_path), "labels_sha256": file_sha256(Path(labels_path))[:16],
              "directions": str(directions_path), "method": method, "held_out": figures}
    try:
        final = (read.fit_readout(x, refused, groups, fitted_on=source, held_out_scores=oof) if method == "readout"
                 else read.calibrate(delta, refused, fitted_on=source))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--labels") from None
    final.save(out)
    rows = []
    for name, fig in figures.items():
        for r in [*fig["groups"], {"group": "pooled", **fig["pooled"]}]:
            rows.append([name, r["group"], str(r["n"]), str(r["refused"]), f"{r['f1']:.3f}",
                         "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                         "-" if r["auroc"] is None else f"{r['auroc']:.3f}"])
    print_table(f"telling the model's refusals, each set held out (the shipped read: {method}); written to {out}",
                ["read", "set", "prompts", "refused", "F1", "accuracy", "AUROC"], rows)
    emit(figures, as_json)


def _labelled(rows: list[dict], prompt_field: str, refused_field: str, group_field: str,
              where: str) -> tuple[list[str], list[bool], list[str]]:
    """Prompts, refusal labels and groups of the label file, or an error naming the row."""
    if not rows:
        raise click.BadParameter(f"{where} holds no rows", param_hint="--labels")
    for field, opt in ((prompt_field, "--prompt-field"), (refused_field, "--refused-field")):
        if field not in rows[0]:
            raise click.BadParameter(f"{where} has no {field!r} column (columns: {sorted(rows[0])})", param_hint=opt)
    prompts, refused, groups = [], [], []
    for i, r in enumerate(rows):
        value = str(r.get(refused_field, "")).strip().lower()
        if value not in _TRUE | _FALSE:
            raise click.BadParameter(f"{where} row {i}: {refused_field} is {r.get(refused_field)!r}, not 1/0 or "
                                     "true/false", param_hint="--labels")
        if not isinstance(r.get(prompt_field), str) or not r[prompt_field].strip():
            raise click.BadParameter(f"{where} row {i}: empty {prompt_field}", param_hint="--labels")
        prompts.append(r[prompt_field])
        refused.append(value in _TRUE)
        groups.append(str(r.get(group_field, "all")))
    return prompts, refused, groups
