"""``pyvene-harm guard crossval``: guard designs judged on prompt sources they never saw.

Every evaluation source is left out in turn; each design is fitted on the others (its layers,
regularisation and threshold decided there) and scored on the one left out, beside the model's
own refusal as a guard. Surface edits of each held-out prompt (final punctuation removed, '.' or
'?' added, first letter's case flipped) give the share of verdicts that surface form flips.
The model's states are computed once per prompt and variant and stored as run units, so a
resumed run, or one that only adds designs to a finished run's folder, costs no forward pass.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import click

from .guard_common import Lazy, labelled_sets_option, parse_labelled_sets
from .options import emit, load_for_recipe, model_num_states, model_options, prompt_set
from .rundir import RunDir
from .tables import print_table

__all__ = ["crossval", "DEFAULT_DESIGNS", "SELECTED"]

SELECTED = "selected"
"""The table column of design selection itself: each source scored by the design that was best
(highest worst accuracy) on the other sources."""

DEFAULT_DESIGNS = ("paper", "paper-mean", "linear-tinst-aug", "linear-mean", "linear-mean-aug", "linear-last16-aug",
                   "linear-post1-aug", "linear-mean-tpost-aug")
"""The designs compared when no --design is given: every preset of
:data:`pyvene_harm.guard.crossval.DESIGNS`."""


@click.command("crossval")
@model_options
@labelled_sets_option
@click.option("--wrap", "wraps", multiple=True,
              help="NAME=TEMPLATES+REQUESTS[:LABEL], repeatable: each jailbreak template of TEMPLATES (with "
                   "[INSERT PROMPT HERE]) around requests drawn from REQUESTS; a source like --set. Example: "
                   "--wrap templates-gptfuzzer=../shared/data/chats_GPTFuzzer.csv+../shared/data/chats_advbench.json")
@click.option("--pool", "pools", multiple=True,
              help="NAME=FILE[:LABEL], repeatable: a training-only source, never scored (designs with "
                   "mine_negatives draw hard negatives from harmless pools). A NAME of SOURCE/POOL makes it part of "
                   "the source SOURCE, left out whenever SOURCE is held out. Example: "
                   "--pool alpaca/train=../shared/data/rd_splits_harmless_train.json:harmless")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="Prompts per source (a seeded sample).")
@click.option("--pool-limit", type=click.IntRange(min=1), default=1500, show_default=True, help="Prompts per pool.")
@click.option("--variants", type=click.IntRange(min=0), default=100, show_default=True,
              help="Prompts per source whose surface variants are run (for the flip rate and for designs that "
                   "augment); 0 = none.")
@click.option("--design", "designs", multiple=True,
              help="A design to compare, repeatable: a preset name or NAME:key=value,... (keys method, reads, layers, "
                   "augment, C, train_on, mine_negatives, balance_sources). Default: the presets of the README's "
                   "table. Example: --design paper --design 'mean:method=linear,reads=mean_inst,layers=8-16'")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompt sampling.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also judge each held-out prompt by the model's own refusal (greedy reply + keyword judge).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated per prompt for the refusal baseline (the release judged 128).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (config.json, results.json, crossval.csv, crossval.png); re-running resumes.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def crossval(mopts, sets, wraps, pools, limit, pool_limit, variants, designs, seed, baseline, max_new_tokens,
             out, as_json):
    """Leave-one-source-out accuracy of guard designs, with the refusal baseline and surface flips.

    \b
    Example:
      D=../shared/data
      pyvene-harm guard crossval -m demo -o runs/crossval \\
        --set advbench=$D/chats_advbench.json --set sorry-bench=$D/chats_sorry-badq.json \\
        --set alpaca=$D/rd_splits_harmless_val.json:harmless --set xstest=$D/chats_xstest-harmless.json:harmless \\
        --design paper --design 'mean:method=linear,reads=mean_inst,layers=8-16,augment=1'
    """
    from ..guard.crossval import PromptSource, parse_design

    n_states = model_num_states(mopts.model)
    try:
        chosen = [parse_design(d, n_states) for d in (designs or DEFAULT_DESIGNS)]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--design") from None
    if len({d.name for d in chosen}) != len(chosen):
        raise click.BadParameter("design names must be unique", param_hint="--design")
    sources = [PromptSource(ps.name, ps.prompts, label) for ps, label in _load_sets(sets, limit, seed)]
    sources += [PromptSource(name, prompts, label) for name, prompts, label in _load_wraps(wraps, limit, seed)]
    sources += [PromptSource(ps.name, ps.prompts, label, evaluate=False, group=ps.name.rpartition("/")[0] or None)
                for ps, label in _load_sets(pools, pool_limit, seed)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"source names must be unique across --set, --wrap and --pool, got {names}")
    evaluated = [s for s in sources if s.evaluate]
    unknown = sorted({s.group for s in sources if s.group} - {s.name for s in evaluated})
    if unknown:
        raise click.BadParameter(f"pools name sources that are not --set or --wrap sources: {unknown}",
                                 param_hint="--pool")
    if len({s.label for s in sources}) < 2 or len(evaluated) < 2:
        raise click.UsageError("leave-one-source-out needs at least two evaluation sources and both labels")
    for d in chosen:
        unknown = sorted(set(d.train_on or ()) - set(names))
        if unknown:
            raise click.BadParameter(f"design {d.name!r} trains on unknown sources {unknown}", param_hint="--design")
    reads = sorted({r for d in chosen for r in d.reads})
    layers = sorted({x for d in chosen for x in (d.layers or range(n_states or 0))}) or None
    if layers is None:
        raise click.UsageError(f"the layer count of {mopts.model} cannot be read from its config: give every "
                               "design explicit layers")
    options = {**mopts.as_dict(), "sets": list(sets), "wraps": list(wraps), "pools": list(pools), "limit": limit,
               "pool_limit": pool_limit, "variants": variants, "seed": seed, "reads": reads, "states": layers,
               "designs": [d.as_dict() for d in chosen], "baseline": baseline, "max_new_tokens": max_new_tokens}
    run = RunDir(out, "guard-crossval", options, free=("designs",))
    lazy = Lazy(lambda: load_for_recipe(mopts))
    blocks = {s.name: _states_unit(run, lazy, s, reads, layers, variants if s.evaluate else 0, mopts.batch_size)
              for s in sources}
    refusals = {s.name: _refusal_unit(run, lazy, s, max_new_tokens, mopts.batch_size)
                for s in evaluated} if baseline else {}
    from ..guard.crossval import GuardDesign, best_design, cross_validate, selected_rows

    result = cross_validate(blocks, chosen, progress=lambda msg: click.echo(f"fitting {msg}", err=True))
    rows = result.rows
    if len(chosen) > 1:  # the choice among designs, judged on sources it did not look at
        rows = rows + selected_rows(rows)
        chosen = [*chosen, GuardDesign(SELECTED)]
    rows = _with_baseline(rows, refusals, {s.name: s for s in evaluated})
    run.write_csv("crossval", rows)
    summary = _summary(rows, chosen, evaluated, refusals)
    results = {"model": mopts.model, "designs": result.designs, "sources": [
        {"name": s.name, "label": s.label, "n": len(s.prompts), "evaluated": s.evaluate} for s in sources],
        "rows": rows, "summary": summary, "pooled_auc": result.pooled_auc, "best_design": best_design(result.rows)}
    run.write_results(results)
    _plot(run, rows, chosen, evaluated, refusals)
    columns, table = _table(rows, chosen, evaluated, refusals, summary, result.pooled_auc)
    run.write_csv("table", [dict(zip(columns, r)) for r in table])
    _print(columns, table, rows)
    emit(results, as_json)


def _load_sets(values: tuple[str, ...], limit: int, seed: int) -> list[tuple[Any, int]]:
    return [(prompt_set(name, path, limit=limit, seed=seed), label)
            for name, path, label in parse_labelled_sets(values)]


def _load_wraps(values: tuple[str, ...], limit: int, seed: int) -> list[tuple[str, list[str], int]]:
    from ..data import PromptDataError, apply_template, load_templates

    out = []
    for name, spec, label in parse_labelled_sets(values):
        templates_path, plus, requests_path = spec.partition("+")
        if not plus or not templates_path or not requests_path:
            raise click.BadParameter(f"{name}={spec!r} is not NAME=TEMPLATES+REQUESTS[:LABEL]", param_hint="--wrap")
        try:
            templates = load_templates(templates_path)
        except (ValueError, OSError, PromptDataError) as err:
            raise click.BadParameter(str(err), param_hint="--wrap") from None
        requests = prompt_set(name, requests_path).prompts
        rng = random.Random(seed)
        per = max(1, -(-limit // len(templates)))
        picked = rng.sample(requests, min(len(requests), per * len(templates)))
        prompts = [apply_template(t, [picked[(k * per + j) % len(picked)]])[0]
                   for k, t in enumerate(templates) for j in range(per)]
        out.append((name, rng.sample(prompts, min(limit, len(prompts))), label))
    return out


def _states_unit(run: RunDir, lazy: Lazy, source, reads: list[str], layers: list[int], n_variants: int,
                 batch_size: int):
    """The source's states (and its variants'), computed once and stored as safetensors."""
    import torch

    from ..guard.crossval import SourceStates, collect_source_states
    from ..surface import SURFACE_EDITS

    def compute() -> dict[str, torch.Tensor]:
        loaded, fmt = lazy()
        b = collect_source_states(loaded.model, fmt, source, reads=reads, states=layers, n_variants=n_variants,
                                  batch_size=batch_size, progress=f"states of {source.name}")
        return {"x": torch.from_numpy(b.x),
                "prompt": torch.tensor([p for p, _ in b.rows], dtype=torch.int64),
                "edit": torch.tensor([-1 if e is None else SURFACE_EDITS.index(e) for _, e in b.rows],
                                     dtype=torch.int64)}

    t = run.tensor_unit(f"states_{source.name}", compute)
    rows = [(int(p), None if e < 0 else SURFACE_EDITS[e]) for p, e in zip(t["prompt"].tolist(), t["edit"].tolist())]
    return SourceStates(source=source, x=t["x"].numpy(), rows=rows, reads=tuple(reads), states=tuple(layers))


def _refusal_unit(run: RunDir, lazy: Lazy, source, max_new_tokens: int, batch_size: int) -> dict:
    from ..analysis import label_replies

    def compute() -> dict:
        loaded, fmt = lazy()
        lab = label_replies(loaded.model, fmt, source.prompts, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=f"answering {source.name}")
        return {"refused": lab.refused, "replies": lab.replies}

    return run.unit(f"refusal_{source.name}", compute)


def _with_baseline(rows: list[dict], refusals: dict[str, dict], sources: dict) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        if r["source"] in refusals:
            refused = refusals[r["source"]]["refused"]
            r["refusal_baseline_accuracy"] = sum(x == bool(sources[r["source"]].label) for x in refused) / len(refused)
        out.append(r)
    return out


def _summary(rows: list[dict], designs, sources, refusals) -> dict[str, dict]:
    """Per design: the worst and mean held-out accuracy, the largest flip rate, and on how many
    sources it beats the model's own refusal."""
    out = {}
    for d in designs:
        mine = [r for r in rows if r["design"] == d.name]
        flips = [r["surface_flip_rate"] for r in mine if r["surface_flip_rate"] is not None]
        entry = {"min_accuracy": min(r["accuracy"] for r in mine),
                 "mean_accuracy": sum(r["accuracy"] for r in mine) / len(mine),
                 "max_surface_flip_rate": max(flips) if flips else None,
                 "mean_surface_flip_rate": sum(flips) / len(flips) if flips else None}
        if refusals:
            entry["beats_refusal_on"] = sum(r["accuracy"] > r["refusal_baseline_accuracy"] for r in mine)
        out[d.name] = entry
    return out


def _table(rows, designs, sources, refusals, summary, pooled) -> tuple[list[str], list[list[str]]]:
    """One row per held-out source, one column per design: accuracy % (surface flips %)."""
    by = {(r["source"], r["design"]): r for r in rows}

    def cell(acc, flips):
        return f"{100 * acc:.1f}" + ("" if flips is None else f" ({100 * flips:.1f})")

    columns = ["held-out source", "n"] + (["refusal"] if refusals else []) + [d.name for d in designs]
    table = []
    for s in sources:
        first = by[(s.name, designs[0].name)]
        table.append([f"{s.name} ({'harmful' if s.label else 'harmless'})", str(first["n"]),
                      *([f"{100 * first['refusal_baseline_accuracy']:.1f}"] if refusals else []),
                      *[cell(by[(s.name, d.name)]["accuracy"], by[(s.name, d.name)]["surface_flip_rate"])
                        for d in designs]])
    table.append(["worst source", "", *([""] if refusals else []),
                  *[cell(summary[d.name]["min_accuracy"], summary[d.name]["max_surface_flip_rate"]) for d in designs]])
    if refusals:
        table.append(["sources above the refusal baseline", "", "",
                      *[f"{summary[d.name]['beats_refusal_on']} of {len(sources)}" for d in designs]])
    if pooled:
        table.append(["AUC, all held-out scores pooled", "", *([""] if refusals else []),
                      *[f"{pooled[d.name]:.3f}" if d.name in pooled else "" for d in designs]])
    return columns, table


def _print(columns: list[str], table: list[list[str]], rows: list[dict]) -> None:
    print_table("accuracy % (surface flips %) on each source, by a guard fitted without it", columns, table)
    picks = [f"{r['source']}: {r['selected_design']}" for r in rows if r["design"] == SELECTED]
    if picks:
        click.echo(f"{SELECTED}: the design with the best worst accuracy on the other sources; " + "; ".join(picks),
                   err=True)


def _plot(run: RunDir, rows, designs, sources, refusals) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["source"], r["design"]): r for r in rows}
    names = [s.name for s in sources]
    x = np.arange(len(names))
    width = 0.8 / max(len(designs), 1)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(names)), 7), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1.4]})
    for j, d in enumerate(designs):
        acc = [100 * by[(n, d.name)]["accuracy"] for n in names]
        flips = [100 * (by[(n, d.name)]["surface_flip_rate"] or 0.0) for n in names]
        ax.bar(x + (j - (len(designs) - 1) / 2) * width, acc, width, label=d.name)
        bx.bar(x + (j - (len(designs) - 1) / 2) * width, flips, width)
    if refusals:
        ax.scatter(x, [100 * by[(n, designs[0].name)]["refusal_baseline_accuracy"] for n in names], marker="_",
                   s=600, color="black", zorder=3, label="model's own refusal")
    ax.axhline(85, color="gray", linestyle=":", linewidth=1)
    ax.set_ylabel("accuracy on the held-out source (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=min(4, len(designs) + 1), loc="lower left")
    bx.axhline(5, color="gray", linestyle=":", linewidth=1)
    bx.set_ylabel("surface flips (%)")
    bx.set_xticks(x)
    bx.set_xticklabels(names, rotation=30, ha="right")
    ax.set_title("Latent Guard designs, each source scored by a guard fitted without it")
    run.save_figure(fig, "crossval")
