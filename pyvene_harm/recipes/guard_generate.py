"""``pyvene-harm guard generate``: guarded generation against the plain model, per prompt set.

The guard reads Delta_harmful from one early-exit prefill; prompts it calls harmful get a fixed
refusal, the others are generated with the refusal direction removed (or steered against), so
the model's over-refusal on harmless-but-scary prompts (XSTest) goes down while jailbreaks that
only suppress refusal (templates) are still refused. Both the plain and the guarded replies are
judged by the keyword refusal judge, so the table shows what a user of each would see.
"""

from __future__ import annotations

from pathlib import Path

import click

from .beliefs import resolve_directions
from .guard_common import (
    Lazy,
    bind_model,
    exclude_option,
    guard_fingerprint,
    guard_model_options,
    labelled_prompt_sets,
    labelled_sets_option,
    load_guard,
    resolve_model_options,
)
from .options import emit, parse_layers
from .rundir import RunDir
from .tables import print_table

__all__ = ["generate"]

UNDO_REFUSAL = ("ablate", "adapter", "add", "none")


@click.command("generate")
@click.option("--guard", "guard_path", required=True, help="Guard folder (from `guard fit`) or Hub repo id.")
@guard_model_options
@click.option("--directions", "directions_path", default=None,
              help="DirectionSet (folder, `extract` run directory or Hub id) whose refusal direction undoes "
                   "over-refusal on prompts the guard lets through. Required unless --undo-refusal none. "
                   "Example: --directions artifacts/qwen2.5-coder-0.5b-instruct/directions")
@click.option("--undo-refusal", type=click.Choice(UNDO_REFUSAL), default="ablate", show_default=True,
              help="ablate: remove the refusal direction at every layer (each layer's own); adapter: the edit "
                   "of `export-adapter`, which a vLLM engine serves (with --layer: that layer's direction removed "
                   "from what every layer writes; without: every layer's own direction kept out of what it "
                   "reads); add: add --coeff x the refusal direction at --layer; none: generate the let-through "
                   "prompts plainly.")
@click.option("--layer", type=int, default=None,
              help="Layer for --undo-refusal add or adapter (e.g. the best layer of `elicit`).")
@click.option("--coeff", type=float, default=-1.0, show_default=True, help="Strength for --undo-refusal add.")
@labelled_sets_option
@exclude_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Prompts per set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompt sampling.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated per reply (plain and guarded) before judging refusal.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (config.json, results.json, generate.csv, replies.csv); re-running resumes.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def generate(guard_path, model_args, directions_path, undo_refusal, layer, coeff, sets, exclude, limit, seed,
             max_new_tokens, out, as_json):
    """Refusal rate per prompt set: the plain model vs guarded generation.

    \b
    Example:
      pyvene-harm guard generate --guard artifacts/qwen2.5-coder-0.5b-instruct/guard \\
        --directions artifacts/qwen2.5-coder-0.5b-instruct/directions -o runs/guarded \\
        --set templates=../shared/data/chats_human-seed-50-adv.json:harmful \\
        --set xstest=../shared/data/chats_xstest-harmless.json:harmless
    """
    loaded_sets = labelled_prompt_sets(sets, exclude, limit=limit, seed=seed)
    g = load_guard(guard_path, model_args["revision"])
    mopts = resolve_model_options(model_args, g, guard_path)
    directions = _check_undo(undo_refusal, directions_path, layer, g)
    options = {**mopts.as_dict(), "guard": guard_path,
               "guard_fingerprint": guard_fingerprint(guard_path, model_args["revision"]),
               "directions": directions_path, "undo_refusal": undo_refusal, "layer": layer,
               "coeff": coeff if undo_refusal == "add" else None, "sets": list(sets), "exclude": exclude[0], "limit": limit,
               "seed": seed, "max_new_tokens": max_new_tokens}
    run = RunDir(out, "guard-generate", options)
    lazy = Lazy(lambda: bind_model(g, mopts))
    summary, rows = [], []
    for ps, label in loaded_sets:
        plain = run.unit(f"plain_{ps.name}", lambda ps=ps: _plain_unit(g, lazy, ps, max_new_tokens, mopts.batch_size))
        guarded = run.unit(f"guarded_{ps.name}", lambda ps=ps: _guarded_unit(
            g, lazy, ps, directions, undo_refusal, layer, coeff, max_new_tokens, mopts.batch_size))
        summary.append(_set_summary(ps.name, label, plain, guarded))
        rows.extend({"set": ps.name, "prompt": p, "label": label, "plain_refused": int(pr),
                     "delta_harmful": dh, "action": a, "guarded_refused": int(gr), "plain_reply": prep,
                     "guarded_reply": grep}
                    for p, pr, prep, dh, a, gr, grep in zip(ps.prompts, plain["refused"], plain["replies"],
                                                            guarded["delta_harmful"], guarded["action"],
                                                            guarded["refused"], guarded["replies"]))
    run.write_csv("generate", summary)
    run.write_csv("replies", rows)
    results = {"guard": guard_path, "model": mopts.model, "undo_refusal": undo_refusal, "sets": summary}
    run.write_results(results)
    print_table("refusal rate (%): plain model vs guarded generation",
                ["set", "label", "n", "plain", "guarded", "guard refused", "generated"],
                [[s["set"], s["label"], str(s["n"]), f"{s['plain_refusal_rate']:.1f}",
                  f"{s['guarded_refusal_rate']:.1f}", str(s["guard_refused"]), str(s["generated"])]
                 for s in summary])
    emit(results, as_json)


def _check_undo(undo_refusal: str, directions_path: str | None, layer: int | None, g):
    if undo_refusal == "none":
        return None
    if directions_path is None:
        raise click.UsageError(f"--undo-refusal {undo_refusal} needs --directions (or pass --undo-refusal none)")
    if undo_refusal == "add" and layer is None:
        raise click.UsageError("--undo-refusal add needs --layer (e.g. the best refusal layer of `elicit`)")
    directions = resolve_directions(directions_path)
    if directions.num_layers != g.metadata_.get("num_layers", directions.num_layers):
        raise click.BadParameter(f"these directions come from a model with {directions.num_layers} layers, the guard "
                                 f"from one with {g.metadata_.get('num_layers')}: pass directions of the guard's model",
                                 param_hint="--directions")
    if layer is not None and undo_refusal in ("add", "adapter"):
        parse_layers(str(layer), directions.num_layers)
    return directions


def _plain_unit(g, lazy: Lazy, ps, max_new_tokens: int, batch_size: int) -> dict:
    from ..analysis import label_replies

    loaded = lazy()
    lab = label_replies(loaded.model, g.chat_formatter(), ps.prompts, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, progress=f"plain replies to {ps.name}")
    return {"replies": lab.replies, "refused": lab.refused}


def _guarded_unit(g, lazy: Lazy, ps, directions, undo_refusal: str, layer: int | None, coeff: float,
                  max_new_tokens: int, batch_size: int) -> dict:
    from ..guard import guarded_generate
    from ..interventions import ablate, steer
    from ..judges import KeywordRefusalJudge

    loaded = lazy()
    steering = None
    if undo_refusal == "ablate":
        steering = ablate(loaded.model, directions, direction="refusal")
    elif undo_refusal == "adapter" and layer is not None:
        steering = ablate(loaded.model, directions, direction="refusal", source_layer=layer, where="writes")
    elif undo_refusal == "adapter":  # the per-layer adapter, through peft (what an engine serves)
        from ..interventions.adapter import AdapterSteering

        steering = AdapterSteering(loaded.model, directions)
    elif undo_refusal == "add":
        steering = steer(loaded.model, directions, direction="refusal", layer=layer, coeff=coeff)
    out = guarded_generate(loaded.model, loaded.tokenizer, ps.prompts, g, refusal_steering=steering,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, formatter=g.chat_formatter(),
                           progress=True)
    replies = [r.reply for r in out]
    return {"replies": replies, "refused": KeywordRefusalJudge()(ps.prompts, replies),
            "delta_harmful": [r.delta_harmful for r in out], "action": [r.action for r in out]}


def _set_summary(name: str, label: int, plain: dict, guarded: dict) -> dict:
    n = len(plain["refused"])
    return {"set": name, "label": "harmful" if label else "harmless", "n": n,
            "plain_refusal_rate": 100.0 * sum(map(bool, plain["refused"])) / n,
            "guarded_refusal_rate": 100.0 * sum(map(bool, guarded["refused"])) / n,
            "guard_refused": sum(a == "refused" for a in guarded["action"]),
            "generated": sum(a != "refused" for a in guarded["action"])}
