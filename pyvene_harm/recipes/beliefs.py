"""``pyvene-harm beliefs`` (Figs. 3 and 6): Delta_harmful vs Delta_refuse per prompt set."""

from __future__ import annotations

from pathlib import Path

import click

from .labelled import LazyModel
from .options import emit, model_options, parse_layers, prompt_set, run_options
from .rundir import RunDir
from .tables import print_table

__all__ = ["beliefs", "resolve_directions"]


def resolve_directions(path: str | None):
    """A DirectionSet from a folder, an extract run directory, or a Hub repo id."""
    from ..directions import DirectionSet

    if path is None:
        return None
    from ..directions import CONFIG_FILE, TENSORS_FILE
    from ..hub import describe_location, locate_artifact

    p = Path(path)
    try:
        if (p / "directions" / "directions.json").exists():
            return DirectionSet.load(p / "directions")
        folder = locate_artifact(path, [CONFIG_FILE, TENSORS_FILE], what="DirectionSet")
        if not p.is_dir():  # say which commit a Hub id resolved to
            click.echo(f"directions: {describe_location(path, folder)}", err=True)
        return DirectionSet.load(folder)
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint="--directions") from None


def parse_sets(values) -> list[tuple[str, str]]:
    out = []
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r} is not NAME=FILE, e.g. xstest=../shared/data/chats_xstest-harmless.json",
                                     param_hint="--set")
        name, path = v.split("=", 1)
        out.append((name.strip(), path.strip()))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise click.BadParameter("set names must be unique", param_hint="--set")
    return out


@click.command()
@model_options
@run_options
@click.option("--directions", "directions_path", required=True,
              help="DirectionSet folder, an `extract` run directory, or a Hub repo id. Example: --directions runs/extract")
@click.option("--set", "sets", multiple=True, required=True,
              help="NAME=FILE, repeatable. Example: --set templates=../shared/data/chats_human-seed-50-adv.json")
@click.option("--layers", default="all", show_default=True, help="Layers to average over: all, 0-12, 3,5,7.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Prompts per set.")
def beliefs(mopts, out, seed, as_json, directions_path, sets, layers, limit):
    """Each prompt's Delta_harmful (at t_inst) and Delta_refuse (at t_post_inst).

    The paper's Fig. 6: jailbreak templates and adversarial suffixes lower Delta_refuse while
    Delta_harmful stays high. Writes beliefs.csv (one row per prompt), means.csv, beliefs.png.

    \b
    Example:
      pyvene-harm beliefs -m demo --directions runs/extract \\
        --set harmful=../shared/data/rd_processed_jailbreakbench.json \\
        --set harmless=../shared/data/chats_example_test_harmless.json \\
        --set xstest=../shared/data/chats_xstest-harmless.json \\
        --set templates=../shared/data/chats_human-seed-50-adv.json -o runs/beliefs
    """
    directions = resolve_directions(directions_path)
    layer_list = parse_layers(layers, directions.n_states)
    loaded_sets = [prompt_set(name, path, limit=limit, seed=seed) for name, path in parse_sets(sets)]
    run = RunDir(out, "beliefs", {**mopts.as_dict(), "directions": directions_path, "sets": list(sets),
                                  "layers": layer_list, "limit": limit, "seed": seed})
    lazy = LazyModel(mopts)
    rows, means = [], []
    for ps in loaded_sets:
        def compute(ps=ps):
            from ..beliefs import compute_beliefs

            loaded, fmt = lazy()
            b = compute_beliefs(loaded.model, fmt, ps.prompts, directions, layers=layer_list,
                                batch_size=mopts.batch_size, progress=f"beliefs {ps.name}")
            return {"delta_harmful": b.delta_harmful.tolist(), "delta_refuse": b.delta_refuse.tolist()}

        unit = run.unit(f"beliefs_{ps.name}", compute)
        for p, h, r in zip(ps.prompts, unit["delta_harmful"], unit["delta_refuse"]):
            rows.append({"set": ps.name, "prompt": p, "delta_harmful": h, "delta_refuse": r})
        n = len(unit["delta_harmful"])
        means.append({"set": ps.name, "n": n, "mean_delta_harmful": sum(unit["delta_harmful"]) / n,
                      "mean_delta_refuse": sum(unit["delta_refuse"]) / n,
                      "share_delta_harmful_positive": sum(h > 0 for h in unit["delta_harmful"]) / n,
                      "share_delta_refuse_positive": sum(r > 0 for r in unit["delta_refuse"]) / n})
    run.write_csv("beliefs", rows)
    run.write_csv("means", means)
    _plot(run, rows)
    results = {"layers": layer_list or "all", "sets": means}
    run.write_results(results)
    print_table("mean beliefs per set", ["set", "n", "Delta_harmful", "Delta_refuse", ">0 harmful", ">0 refuse"],
                [[m["set"], str(m["n"]), f"{m['mean_delta_harmful']:+.4f}", f"{m['mean_delta_refuse']:+.4f}",
                  f"{m['share_delta_harmful_positive']:.2f}", f"{m['share_delta_refuse_positive']:.2f}"]
                 for m in means])
    emit(results, as_json)


def _plot(run, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name in dict.fromkeys(r["set"] for r in rows):
        xs = [r["delta_harmful"] for r in rows if r["set"] == name]
        ys = [r["delta_refuse"] for r in rows if r["set"] == name]
        ax.scatter(xs, ys, s=12, alpha=0.7, label=name)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("Delta_harmful (t_inst)")
    ax.set_ylabel("Delta_refuse (t_post_inst)")
    ax.set_title("harmfulness belief vs refusal belief")
    ax.legend(fontsize=7)
    run.save_figure(fig, "beliefs")
