"""``pyvene-harm extract``: split prompts by the model's own refusals, extract both directions."""

from __future__ import annotations

import click

from .options import emit, load_for_recipe, model_options, prompt_set, require, run_options
from .rundir import RunDir

__all__ = ["extract", "plot_directions"]


@click.command()
@model_options
@run_options
@click.option("--harmful", type=click.Path(), required=True,
              help="Harmful prompts (JSON, JSONL, CSV, TXT or hf://owner/name). "
                   "Example: --harmful ../shared/data/chats_advbench.json")
@click.option("--harmless", type=click.Path(), required=True,
              help="Harmless prompts. Example: --harmless ../shared/data/rd_splits_harmless_train.json")
@click.option("--harmful-field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--harmless-field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--limit", type=click.IntRange(min=1), default=60, show_default=True,
              help="Prompts per set, sampled with --seed.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated to judge refusal for the refusal split (the release judged 128).")
@click.option("--no-split", is_flag=True, help="Do not split by refusal: use all harmful vs all harmless.")
@click.option("--pool-refusal", is_flag=True,
              help="Refusal direction from every refused vs every accepted prompt, whatever their harm.")
def extract(mopts, out, seed, as_json, harmful, harmless, harmful_field, harmless_field, limit,
            max_new_tokens, no_split, pool_refusal):
    """Extract the harmfulness (t_inst) and refusal (t_post_inst) directions.

    Writes directions/ (safetensors + JSON), directions.csv (norms and cosine per layer),
    groups.csv (each prompt's reply and refusal label) and directions.png.

    \b
    Example:
      pyvene-harm extract -m demo --harmful ../shared/data/chats_advbench.json \\
        --harmless ../shared/data/rd_splits_harmless_train.json --limit 60 -o runs/extract
    """
    hf = prompt_set("harmful", harmful, field=harmful_field, limit=limit, seed=seed)
    hl = prompt_set("harmless", harmless, field=harmless_field, limit=limit, seed=seed)
    require([hf, hl], ["harmful", "harmless"])
    options = {**mopts.as_dict(), "harmful": harmful, "harmless": harmless, "harmful_field": harmful_field,
               "harmless_field": harmless_field, "limit": limit, "seed": seed,
               "max_new_tokens": max_new_tokens, "split_by_refusal": not no_split,
               "pool_refusal": pool_refusal}
    run = RunDir(out, "extract", options)

    from ..directions import DirectionSet
    from ..extract import extract_directions

    stored = run.read(lambda path: DirectionSet.load(path / "directions")
                      if (path / "directions" / "directions.json").exists() else None)
    if stored is not None:
        directions = stored
        results = _results(directions, None)
    else:
        loaded, fmt = load_for_recipe(mopts)
        try:
            ex = extract_directions(loaded.model, loaded.tokenizer, hf.prompts, hl.prompts, formatter=fmt,
                                    split_by_refusal=not no_split, max_new_tokens=max_new_tokens,
                                    batch_size=mopts.batch_size, pool_refusal_groups=pool_refusal,
                                    model_id=loaded.model_id, progress=True)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        directions = ex.directions
        rows = []
        for name, ps in (("harmful", hf.prompts), ("harmless", hl.prompts)):
            for i, p in enumerate(ps):
                rows.append({"set": name, "prompt": p, "group": ex.groups[name][i],
                             "reply": ex.replies.get(name, [""] * len(ps))[i]})
        run.write_csv("groups", rows)
        if run.writes:
            directions.save(run.path / "directions")
        results = _results(directions, ex.groups)
    run.write_csv("directions", directions.summary())
    run.save_figure(plot_directions(directions, title=directions.metadata.get("model_id", "")), "directions")
    run.write_results(results)
    _print_table(directions)
    emit(results, as_json)


def _results(directions, groups) -> dict:
    cos = directions.cosine()
    res = {
        "model_id": directions.metadata.get("model_id"),
        "group_sizes": directions.metadata.get("group_sizes"),
        "per_layer": directions.summary(),
        "mean_abs_cosine": float(cos.abs().mean()),
        "max_abs_cosine": float(cos.abs().max()),
        "directions_dir": "directions",
    }
    if groups is not None:
        counts: dict[str, int] = {}
        for labels in groups.values():
            for g in labels:
                counts[g] = counts.get(g, 0) + 1
        res["split"] = counts
    else:
        res["split"] = directions.metadata.get("group_sizes")
    return res


def plot_directions(directions, title: str = ""):
    """Norms of both directions and their cosine, per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms, cos = directions.norms(), directions.cosine()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = range(directions.n_states)
    a.plot(x, norms["harmfulness"].numpy(), marker="o", label="harmfulness (t_inst)")
    a.plot(x, norms["refusal"].numpy(), marker="s", label="refusal (t_post_inst)")
    a.set_xlabel("layer")
    a.set_ylabel("norm")
    a.legend()
    b.plot(x, cos.numpy(), marker="o", color="tab:purple")
    b.axhline(0, color="grey", lw=0.5)
    b.set_xlabel("layer")
    b.set_ylabel("cos(harmfulness, refusal)")
    fig.suptitle(title)
    return fig


def _print_table(directions) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="directions per layer")
    for col in ("layer", "|harmfulness|", "|refusal|", "cosine"):
        table.add_column(col, justify="right")
    for row in directions.summary():
        table.add_row(str(row["layer"]), f"{row['harmfulness_norm']:.3f}", f"{row['refusal_norm']:.3f}",
                      f"{row['cosine']:+.3f}")
    Console(stderr=True).print(table)
