"""``pyvene-harm finetune`` (Fig. 7): a LoRA fine-tuning attack vs the harmfulness belief."""

from __future__ import annotations

import random

import click

from .beliefs import resolve_directions
from .labelled import LazyModel
from .options import emit, model_num_states, model_options, prompt_set, run_options
from .rundir import RunDir
from .tables import print_table

__all__ = ["finetune", "parse_sizes_option", "plot_finetune"]


def parse_sizes_option(text: str) -> list[int]:
    """``"0,50,100"`` -> ``[0, 50, 100]`` (0, the model before fine-tuning, is always added)."""
    from ..finetune import parse_sizes

    try:
        return parse_sizes([int(part) for part in text.split(",") if part.strip()])
    except ValueError:
        raise click.BadParameter(f"cannot read sizes {text!r}: use non-negative integers, e.g. 0,50,100,200",
                                 param_hint="--sizes") from None


@click.command()
@model_options
@run_options
@click.option("--harmful", type=click.Path(), required=True,
              help="Train pool of harmful prompts, used in a seeded random order. "
                   "Example: --harmful ../shared/data/rd_splits_harmful_train.json")
@click.option("--test", "test_path", type=click.Path(), required=True,
              help="Held-out harmful prompts (overlap with --harmful is dropped from training). "
                   "Example: --test ../shared/data/chats_advbench.json")
@click.option("--harmless", type=click.Path(), default=None,
              help="Harmless prompts for extracting the directions when --directions is not given. "
                   "Example: --harmless ../shared/data/rd_splits_harmless_train.json")
@click.option("--directions", "directions_path", default=None,
              help="DirectionSet folder, an `extract` run directory, or a Hub repo id. Example: --directions runs/extract")
@click.option("--harmful-field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--test-field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--harmless-field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--sizes", default="0,50,100,200,400", show_default=True,
              help="Numbers of training pairs N, comma-separated; 0 (before fine-tuning) is always run.")
@click.option("--layer", type=click.IntRange(min=0), default=None,
              help="Decoder layer steered to write compliant answers [default: the middle layer].")
@click.option("--coeff", type=float, default=-1.0, show_default=True,
              help="Strength of the refusal-direction addition; negative steers away from refusal.")
@click.option("--steer-method", type=click.Choice(["add", "ablate"]), default="add", show_default=True,
              help="add: coeff * v_refuse at --layer; ablate: remove --layer's refusal direction everywhere.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Passes over the N pairs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True,
              help="AdamW learning rate for the LoRA adapters.")
@click.option("--lora-r", type=click.IntRange(min=1), default=8, show_default=True,
              help="LoRA rank (alpha = 2 * rank) on q/k/v/o_proj.")
@click.option("--train-batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Pairs per optimiser step.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens per compliant answer and per judged reply.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Held-out test prompts, sampled with --seed.")
@click.option("--extract-limit", type=click.IntRange(min=1), default=60, show_default=True,
              help="Train-pool and --harmless prompts for extracting directions (without --directions).")
@click.option("--no-split", is_flag=True,
              help="Extract directions from all harmful vs all harmless prompts, not split by refusal.")
def finetune(mopts, out, seed, as_json, harmful, test_path, harmless, directions_path, harmful_field, test_field,
             harmless_field, sizes, layer, coeff, steer_method, epochs, lr, lora_r, train_batch_size,
             max_new_tokens, limit, extract_limit, no_split):
    """Fine-tune on N compliant answers, then measure acceptance and Delta_harmful.

    The paper's Fig. 7: LoRA fine-tuning on a few (harmful instruction, compliant answer)
    pairs makes the model accept held-out harmful prompts, while their Delta_harmful - read
    with the ORIGINAL model's directions - barely moves. Compliant answers are the model's
    own, written while steering against its refusal direction; answers the keyword judge
    still calls refusals are dropped. Writes finetune.csv (one row per N), replies.csv,
    pairs.csv, finetune.png and results.json.

    \b
    Example:
      pyvene-harm finetune -m demo --harmful ../shared/data/rd_splits_harmful_train.json \\
        --test ../shared/data/chats_advbench.json \\
        --harmless ../shared/data/rd_splits_harmless_train.json --sizes 0,50,100 -o runs/finetune
    """
    ns = parse_sizes_option(sizes)
    n_states = model_num_states(mopts.model)
    if layer is not None and n_states is not None and layer >= n_states - 1:
        raise click.BadParameter(f"layer {layer} is out of range: this model has {n_states - 1} decoder layers "
                                 f"(0-{n_states - 2})", param_hint="--layer")
    if directions_path is None and harmless is None:
        raise click.UsageError("pass --directions (an extract run or a DirectionSet) or --harmless to extract them")
    directions = resolve_directions(directions_path)
    if directions is not None and n_states is not None and directions.n_states != n_states:
        raise click.BadParameter(f"these directions cover {directions.n_states} states but the model has "
                                 f"{n_states}: extract directions for this model", param_hint="--directions")
    if directions is not None and layer is not None and layer >= directions.n_states - 1:
        raise click.BadParameter(f"layer {layer} is out of range: these directions cover "
                                 f"{directions.n_states - 1} decoder layers (0-{directions.n_states - 2})",
                                 param_hint="--layer")
    pool = prompt_set("harmful", harmful, field=harmful_field).prompts
    test = prompt_set("test", test_path, field=test_field, limit=limit, seed=seed).prompts
    random.Random(seed).shuffle(pool)
    held_out = set(test)
    train = [p for p in pool if p not in held_out]
    if not train:
        raise click.BadParameter("every --harmful prompt is also a --test prompt: nothing is left to train on",
                                 param_hint="--harmful")
    harmless_set = (prompt_set("harmless", harmless, field=harmless_field, limit=extract_limit, seed=seed)
                    if directions is None else None)
    run = RunDir(out, "finetune", {
        **mopts.as_dict(), "harmful": harmful, "test": test_path, "harmless": harmless,
        "directions": directions_path, "harmful_field": harmful_field, "test_field": test_field,
        "harmless_field": harmless_field, "sizes": ns, "layer": layer, "coeff": coeff,
        "steer_method": steer_method, "epochs": epochs, "lr": lr, "lora_r": lora_r, "lora_alpha": 2 * lora_r,
        "train_batch_size": train_batch_size, "max_new_tokens": max_new_tokens, "limit": limit,
        "extract_limit": extract_limit, "split_by_refusal": not no_split, "seed": seed})
    lazy = LazyModel(mopts)

    from .. import finetune as ft

    if directions is None:
        directions = _extracted_directions(run, lazy, train[:extract_limit], harmless_set.prompts, mopts,
                                           max_new_tokens, split=not no_split)
    steer_layer = layer if layer is not None else (directions.n_states - 1) // 2

    def make_pairs():
        loaded, fmt = lazy()
        got = _library_call(ft.make_compliant_pairs, loaded.model, fmt, train, directions, layer=steer_layer,
                            coeff=coeff, method=steer_method, max_new_tokens=max_new_tokens, limit=ns[-1],
                            batch_size=mopts.batch_size, progress="writing compliant answers")
        return {"pairs": [p.as_dict() for p in got.pairs], "rejected": [p.as_dict() for p in got.rejected]}

    made = run.unit("pairs", make_pairs)
    pairs = [ft.TrainingPair.coerce(p) for p in made["pairs"]]
    if len(pairs) < ns[-1]:
        raise click.ClickException(
            f"only {len(pairs)} of {len(pairs) + len(made['rejected'])} steered answers were compliant, fewer "
            f"than the largest size {ns[-1]}: give more --harmful prompts, steer harder (--coeff, "
            "--steer-method ablate, another --layer) or lower --sizes")

    units = {}
    for n in ns:
        def compute(n=n):
            loaded, fmt = lazy()
            model, losses = loaded.model, []
            if n > 0:
                model = _library_call(ft.lora_finetune, loaded.model, fmt, pairs[:n], r=lora_r, alpha=2 * lora_r,
                                      lr=lr, epochs=epochs, batch_size=train_batch_size, seed=seed,
                                      on_step=lambda step, loss: losses.append(loss),
                                      progress=f"fine-tuning N={n}")
            ev = _library_call(ft.evaluate_attack, model, fmt, directions, test, max_new_tokens=max_new_tokens,
                               batch_size=mopts.batch_size, progress=f"evaluating N={n}")
            row = ev.row(n, train_loss=ft.last_epoch_loss(losses, n, train_batch_size))
            return {"row": row, "replies": ev.replies, "refused": ev.refused,
                    "delta_harmful": ev.delta_harmful, "delta_refuse": ev.delta_refuse}

        units[n] = run.unit(f"n_{n}", compute)

    rows = [units[n]["row"] for n in ns]
    run.write_csv("finetune", rows)
    run.write_csv("replies", [
        {"n": n, "prompt": p, "reply": units[n]["replies"][i], "refused": units[n]["refused"][i],
         "delta_harmful": units[n]["delta_harmful"][i], "delta_refuse": units[n]["delta_refuse"][i]}
        for n in ns for i, p in enumerate(test)])
    run.write_csv("pairs", [{**p, "compliant": True} for p in made["pairs"][:ns[-1]]]
                  + [{**p, "compliant": False} for p in made["rejected"]])
    results = {
        "model_id": directions.metadata.get("model_id"), "steer_layer": steer_layer, "steer_method": steer_method,
        "coeff": coeff, "n_test": len(test), "n_train_pool": len(train),
        "pairs": {"tried": len(made["pairs"]) + len(made["rejected"]), "compliant": len(made["pairs"]),
                  "rejected": len(made["rejected"])},
        "rows": rows,
        "delta_harmful_shift": rows[-1]["mean_delta_harmful"] - rows[0]["mean_delta_harmful"],
        "acceptance_shift": rows[-1]["acceptance_rate"] - rows[0]["acceptance_rate"],
        "paper": "Fig. 7: with 50-400 pairs acceptance rises while Delta_harmful on held-out prompts barely moves",
    }
    run.write_results(results)
    run.save_figure(plot_finetune(rows, title=str(results["model_id"] or "")), "finetune")
    print_table("Fig. 7: fine-tuning attack on held-out harmful prompts",
                ["N", "acceptance", "Delta_harmful", "Delta_refuse", "train loss"],
                [[str(r["n"]), f"{100 * r['acceptance_rate']:.1f}%", f"{r['mean_delta_harmful']:+.4f}",
                  f"{r['mean_delta_refuse']:+.4f}", "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"]
                 for r in rows])
    emit(results, as_json)


def _library_call(fn, *args, **kwargs):
    """Library errors (a bad layer, too few pairs) become click errors, not tracebacks."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise click.ClickException(str(err)) from None


def _extracted_directions(run: RunDir, lazy: LazyModel, harmful: list[str], harmless: list[str], mopts,
                          max_new_tokens: int, *, split: bool):
    """Directions from the train pool and --harmless, saved under the run (and reused on resume)."""
    from ..directions import DirectionSet
    from ..extract import extract_directions

    folder = run.path / "directions"
    if (folder / "directions.json").exists():
        return DirectionSet.load(folder)
    loaded, fmt = lazy()
    try:
        ex = extract_directions(loaded.model, loaded.tokenizer, harmful, harmless, formatter=fmt,
                                split_by_refusal=split, max_new_tokens=max_new_tokens,
                                batch_size=mopts.batch_size, model_id=loaded.model_id, progress=True)
    except ValueError as err:
        hint = " (on the command line: --no-split, or pass --directions)" if split else ""
        raise click.ClickException(f"{err}{hint}") from None
    ex.directions.save(folder)
    return ex.directions


def plot_finetune(rows, title: str = ""):
    """Acceptance rate (left) and mean beliefs (right) against the number of training pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(ns, [100 * r["acceptance_rate"] for r in rows], marker="o", color="tab:red")
    a.set_ylim(-2, 102)
    a.set_xlabel("training pairs N")
    a.set_ylabel("acceptance on held-out harmful (%)")
    b.plot(ns, [r["mean_delta_harmful"] for r in rows], marker="o", label="Delta_harmful (t_inst)")
    b.plot(ns, [r["mean_delta_refuse"] for r in rows], marker="s", label="Delta_refuse (t_post_inst)")
    b.axhline(0, color="grey", lw=0.5)
    b.set_xlabel("training pairs N")
    b.set_ylabel("mean belief (base-model directions)")
    b.legend(fontsize=8)
    fig.suptitle(title)
    return fig
