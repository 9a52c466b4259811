"""``pyvene-harm cluster`` (Fig. 2): where accepted-harmful and refused-harmless prompts sit."""

from __future__ import annotations

import click

from .labelled import LazyModel, labelled_units
from .options import emit, model_options, prompt_set, require, run_options
from .rundir import RunDir
from .tables import print_table

__all__ = ["cluster"]

GROUPS = ("refused_harmful", "accepted_harmless", "accepted_harmful", "refused_harmless")


@click.command()
@model_options
@run_options
@click.option("--harmful", type=click.Path(), required=True, multiple=True,
              help="Harmful prompt files (repeatable). Example: --harmful ../shared/data/chats_advbench.json "
                   "--harmful ../shared/data/chats_sorry-badq.json")
@click.option("--harmless", type=click.Path(), required=True, multiple=True,
              help="Harmless prompt files (repeatable). Example: --harmless ../shared/data/chats_xstest-harmless.json")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Prompts per file.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated to judge refusal (the release judged 128 for Table 1; refusals that start late are missed with fewer).")
def cluster(mopts, out, seed, as_json, harmful, harmless, limit, max_new_tokens):
    """Per layer, the share of each group closer to the refused-harmful centroid than to the
    accepted-harmless one, at t_inst and at t_post_inst (the paper's Fig. 2).

    The paper finds accepted-harmful prompts in the harmful cluster at t_inst but the
    harmless one at t_post_inst, and refused-harmless prompts the other way round.

    \b
    Example:
      pyvene-harm cluster -m demo --harmful ../shared/data/chats_advbench.json \\
        --harmful ../shared/data/chats_sorry-badq.json \\
        --harmless ../shared/data/rd_splits_harmless_val.json \\
        --harmless ../shared/data/chats_xstest-harmless.json -o runs/cluster
    """
    sets = [prompt_set(f"harmful{i}", f, limit=limit, seed=seed) for i, f in enumerate(harmful)]
    sets += [prompt_set(f"harmless{i}", f, limit=limit, seed=seed) for i, f in enumerate(harmless)]
    require(sets, ["harmful"] * len(harmful) + ["harmless"] * len(harmless))
    run = RunDir(out, "cluster", {**mopts.as_dict(), "harmful": list(harmful), "harmless": list(harmless),
                                  "limit": limit, "seed": seed, "max_new_tokens": max_new_tokens})
    lazy = LazyModel(mopts)
    labelled = labelled_units(run, sets, lazy, max_new_tokens=max_new_tokens, batch_size=mopts.batch_size)
    prompts, groups = [], []
    for ps in sets:
        kind = "harmful" if ps.name.startswith("harmful") else "harmless"
        for p, refused in zip(labelled[ps.name]["prompts"], labelled[ps.name]["refused"]):
            prompts.append(p)
            groups.append(f"{'refused' if refused else 'accepted'}_{kind}")
    sizes = {g: groups.count(g) for g in GROUPS}
    if sizes["refused_harmful"] < 2 or sizes["accepted_harmless"] < 2:
        raise click.ClickException(
            f"too few reference prompts ({sizes}): need refused harmful and accepted harmless prompts")

    def compute():
        from ..analysis import cluster_closeness
        from ..collect import collect_stats
        from ..pyvene_support import decoder_layers

        loaded, fmt = lazy()
        n_states = len(decoder_layers(loaded.model)) + 1
        stats = collect_stats(loaded.model, fmt, prompts, groups, keep_layers=range(n_states),
                              batch_size=mopts.batch_size, progress="collecting")
        out = {}
        for pos in ("t_inst", "t_post_inst"):
            states = {g: stats.states[g][pos] for g in stats.states}
            res = cluster_closeness(states, harmful="refused_harmful", harmless="accepted_harmless",
                                    probes=[g for g in ("accepted_harmful", "refused_harmless") if sizes[g]])
            out[pos] = {g: v.tolist() for g, v in res.items()}
        return out

    closeness = run.unit("closeness", compute)
    rows = []
    for pos, by_group in closeness.items():
        for g, values in by_group.items():
            for layer, v in enumerate(values):
                rows.append({"position": pos, "group": g, "layer": layer, "share_closer_to_harmful": v})
    run.write_csv("cluster", rows)
    _plot(run, closeness, sizes)
    mid = {pos: {g: sum(v) / len(v) for g, v in by.items()} for pos, by in closeness.items()}
    results = {"group_sizes": sizes, "closeness": closeness, "mean_over_layers": mid}
    run.write_results(results)
    print_table("share of prompts closer to the harmful cluster (mean over layers)",
                ["group", "n", "t_inst", "t_post_inst"],
                [[g, str(sizes[g]), f"{mid['t_inst'].get(g, float('nan')):.2f}",
                  f"{mid['t_post_inst'].get(g, float('nan')):.2f}"] for g in GROUPS if g in mid["t_inst"]])
    emit(results, as_json)


def _plot(run, closeness, sizes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"refused_harmful": "tab:red", "accepted_harmless": "tab:blue",
              "accepted_harmful": "tab:orange", "refused_harmless": "tab:green"}
    for pos, by_group in closeness.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for g, values in by_group.items():
            ax.plot(range(len(values)), values, marker="o", ms=3, color=colors.get(g),
                    label=f"{g.replace('_', ' ')} (n={sizes[g]})")
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("layer")
        ax.set_ylabel("share closer to harmful cluster")
        ax.set_title(f"clustering at {pos}")
        ax.legend(fontsize=7)
        run.save_figure(fig, f"cluster_{pos}")
