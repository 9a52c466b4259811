"""``pyvene-harm elicit`` (Fig. 4): steer harmless prompts along each direction, per layer."""

from __future__ import annotations

import click

from .beliefs import resolve_directions
from .labelled import LazyModel
from .options import emit, model_options, parse_layers, prompt_set, run_options
from .rundir import RunDir
from .sweep import layer_sweep, plot_sweep
from .tables import print_table

__all__ = ["elicit"]


def _refusal_score(prompts, replies):
    from ..judges import KeywordRefusalJudge

    flags = KeywordRefusalJudge()(prompts, replies)
    return {"refusal_rate": 100.0 * sum(flags) / len(flags)}


@click.command()
@model_options
@run_options
@click.option("--directions", "directions_path", required=True,
              help="DirectionSet folder, `extract` run directory or Hub id. Example: --directions runs/extract")
@click.option("--harmless", type=click.Path(), required=True,
              help="Harmless prompts to steer. Example: --harmless ../shared/data/chats_example_test_harmless.json")
@click.option("--field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--layers", default="all", show_default=True, help="Layers to sweep: all, 4-16, 3,6,9.")
@click.option("--coeff", type=float, default=1.0, show_default=True, help="Steering strength c in h + c*v.")
@click.option("--positions", default="all_prompt", show_default=True,
              help="Where to steer: all_prompt, t_inst, t_post_inst, post_inst, context, or unions like t_inst+t_post_inst.")
@click.option("--steer-generated", is_flag=True, help="Also steer every generated token (the paper steers the prompt only).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Prompts, sampled with --seed.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=100, show_default=True,
              help="Tokens generated per steered reply before judging refusal (the release's steering runs used 100-400).")
def elicit(mopts, out, seed, as_json, directions_path, harmless, field, layers, coeff, positions, steer_generated,
           limit, max_new_tokens):
    """Refusal rate of harmless prompts steered along the harmfulness and the refusal direction,
    one layer at a time. The paper (Llama3) peaks at layer 9 (harmfulness, 94%) and 11 (refusal, 100%).

    \b
    Example:
      pyvene-harm elicit -m demo --directions runs/extract \\
        --harmless ../shared/data/chats_example_test_harmless.json --layers 2-20 -o runs/elicit
    """
    directions = resolve_directions(directions_path)
    layer_list = parse_layers(layers, directions.n_states) or list(range(directions.num_layers))
    _check_positions(positions)
    ps = prompt_set("harmless", harmless, field=field, limit=limit, seed=seed)
    run = RunDir(out, "elicit", {**mopts.as_dict(), "directions": directions_path, "harmless": harmless,
                                 "field": field, "layers": layer_list, "coeff": coeff, "positions": positions,
                                 "steer_generated": steer_generated, "limit": limit, "seed": seed,
                                 "max_new_tokens": max_new_tokens})
    lazy = LazyModel(mopts)
    common = dict(layers=layer_list, coeff=coeff, positions=positions, wrapper=None, generated=steer_generated,
                  max_new_tokens=max_new_tokens, batch_size=mopts.batch_size, score=_refusal_score)
    rows = layer_sweep(run, lazy, directions, ps.prompts, name="baseline", direction=None, **common)
    for d in ("harmfulness", "refusal"):
        rows += layer_sweep(run, lazy, directions, ps.prompts, name=d, direction=d, **common)
    run.write_csv("elicit", rows)
    base = rows[0]["refusal_rate"]
    plot_sweep(run, rows, metric="refusal_rate", ylabel="refusal rate on harmless prompts (%)",
               title=f"eliciting refusal (c={coeff}; dashed: unsteered {base:.0f}%)", filename="elicit",
               baselines={"harmfulness": base, "refusal": base})
    best = {d: max((r for r in rows if r["condition"] == d), key=lambda r: r["refusal_rate"])
            for d in ("harmfulness", "refusal")}
    results = {"n_prompts": len(ps.prompts), "baseline_refusal_rate": base,
               "best": {d: {"layer": r["layer"], "refusal_rate": r["refusal_rate"]} for d, r in best.items()},
               "per_layer": rows,
               "paper_llama3": {"harmfulness": {"layer": 9, "refusal_rate": 94.0},
                                "refusal": {"layer": 11, "refusal_rate": 100.0}}}
    run.write_results(results)
    print_table(f"refusal rate on harmless prompts (%), unsteered {base:.1f}",
                ["layer", "harmfulness", "refusal"],
                [[str(layer)] + [f"{r['refusal_rate']:.1f}" for r in rows if r["layer"] == layer] for layer in layer_list])
    emit(results, as_json)


def _check_positions(positions: str) -> None:
    from ..interventions import parse_positions

    try:
        parse_positions(positions)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--positions") from None
