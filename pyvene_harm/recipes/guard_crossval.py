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

__all__ = ["crossval", "crossval_tables", "DEFAULT_DESIGNS", "SELECTED"]

SELECTED = "selected"
"""The table column of design selection itself: each source scored by the design that was best
(highest worst accuracy) on the other sources."""

DEFAULT_DESIGNS = ("paper", "paper-mean", "linear-tinst-aug", "linear-mean", "linear-mean-aug", "linear-last16-aug",
                   "linear-post1-aug", "linear-mean-tpost-aug", "ngram", "length")
"""The designs compared when no --design is given: every preset of
:data:`pyvene_harm.guard.crossval.DESIGNS`, the two text-only controls included."""

CONTROL_DESIGNS = ("ngram", "length")
"""Run beside whatever --design asks for, unless --no-controls: a latent guard is judged against
what the words alone give."""


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
@click.option("--shift", "shifts", multiple=True,
              help="NAME=FILE[:LABEL], repeatable: a shift source, never fitted on, scored by every design fitted on "
                   "all the --set and --wrap sources (e.g. requests in other languages). Example: "
                   "--shift other-languages=pyvene_harm/prompts/multilingual_harmful.jsonl:harmful")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="Prompts per source (a seeded sample).")
@click.option("--pool-limit", type=click.IntRange(min=1), default=1500, show_default=True, help="Prompts per pool.")
@click.option("--variants", type=click.IntRange(min=0), default=100, show_default=True,
              help="Prompts per source whose surface variants are run (for the flip rate and for designs that "
                   "augment); 0 = none.")
@click.option("--design", "designs", multiple=True,
              help="A design to compare, repeatable: a preset name or NAME:key=value,... (keys method, reads, layers, "
                   "augment, C, train_on, mine_negatives, balance_sources, sentence_budget, margin_only, ...). Default: every preset (the designs "
                   "table of results/README.md). Example: --design paper --design 'mean:method=linear,reads=mean_inst,layers=8-16'")
@click.option("--controls/--no-controls", default=True, show_default=True,
              help="Run the text-only controls (ngram: TF-IDF word and character n-grams; length) beside the designs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompt sampling.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also judge each held-out prompt by the model's own refusal (greedy reply + keyword judge).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated per prompt for the refusal baseline (the release judged 128).")
@click.option("--states-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of states shared with `guard fit --states-cache`: prompts already there cost no forward "
                   "pass, and those computed here are added (reused by a fit whose design reads the same states).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (config.json, results.json, crossval.csv, crossval.png); re-running resumes.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def crossval(mopts, sets, wraps, pools, shifts, limit, pool_limit, variants, designs, controls, seed, baseline, max_new_tokens,
             states_cache, out, as_json):
    """Leave-one-source-out accuracy of guard designs, with the refusal baseline and surface flips.

    \b
    Example:
      D=../shared/data
      pyvene-harm guard crossval -m demo -o runs/crossval \\
        --set advbench=$D/chats_advbench.json --set sorry-bench=$D/chats_sorry-badq.json \\
        --set jailbreakbench=$D/rd_processed_jailbreakbench.json --set alpaca=$D/rd_splits_harmless_val.json:harmless \\
        --set alpacaeval=$D/chats_example_test_harmless.json:harmless --set xstest=$D/chats_xstest-harmless.json:harmless \\
        --design paper --design 'mean:method=linear,reads=mean_inst,layers=8-16,augment=1'
    """
    from ..guard.crossval import PromptSource, parse_design

    n_states = model_num_states(mopts.model)
    try:
        asked = list(designs or DEFAULT_DESIGNS)
        asked += [c for c in CONTROL_DESIGNS if controls and c not in asked]
        chosen = [parse_design(d, n_states) for d in asked]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--design") from None
    if len({d.name for d in chosen}) != len(chosen):
        raise click.BadParameter("design names must be unique", param_hint="--design")
    sources = [PromptSource(ps.name, ps.prompts, label) for ps, label in _load_sets(sets, limit, seed)]
    sources += [PromptSource(name, prompts, label) for name, prompts, label in _load_wraps(wraps, limit, seed)]
    sources += [PromptSource(ps.name, ps.prompts, label, evaluate=False, group=ps.name.rpartition("/")[0] or None)
                for ps, label in _load_sets(pools, pool_limit, seed)]
    sources += [PromptSource(ps.name, ps.prompts, label, train=False) for ps, label in _load_sets(shifts, limit, seed)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"source names must be unique across --set, --wrap and --pool, got {names}")
    evaluated = [s for s in sources if s.evaluate]
    unknown = sorted({s.group for s in sources if s.group} - {s.name for s in evaluated if s.train})
    if unknown:
        raise click.BadParameter(f"pools name sources that are not --set or --wrap sources: {unknown}",
                                 param_hint="--pool")
    if len({s.label for s in sources}) < 2 or sum(s.train for s in evaluated) < 2:
        raise click.UsageError("leave-one-source-out needs at least two evaluation sources and both labels")
    for held in (s for s in evaluated if s.train):
        left = {s.label for s in sources if s.train and s.origin != held.origin}
        if left != {0, 1}:
            missing = " or ".join(("harmless", "harmful")[x] for x in sorted({0, 1} - left))
            raise click.UsageError(f"with {held.name!r} left out, no other source is {missing}: give at least two "
                                   "sources of each label (--set NAME=FILE:harmful / :harmless)")
    for d in chosen:
        unknown = sorted(set(d.train_on or ()) - set(names))
        if unknown:
            raise click.BadParameter(f"design {d.name!r} trains on unknown sources {unknown}", param_hint="--design")
        harmless = {s.name for s in evaluated if s.train and s.label == 0}
        odd = sorted(set(d.margin_only or ()) - harmless)
        if odd:
            raise click.BadParameter(f"design {d.name!r} fits its sentence margin on {odd}, which are not harmless "
                                     f"sources of this run ({', '.join(sorted(harmless))}): add them with "
                                     "--set NAME=FILE:harmless", param_hint="--design")
        _check_folds_for_c(d, [s for s in evaluated if s.train])
    from ..reads import fixed_reads, scan_width, sentence_width

    reads = sorted({r for d in chosen if not d.is_control for r in fixed_reads(d.reads)})
    sentences = any(not d.is_control and sentence_width(d.reads[0]) is not None for d in chosen)
    tokens = sentences or any(not d.is_control and scan_width(d.reads[0]) is not None for d in chosen)
    layers = sorted({x for d in chosen if not d.is_control for x in (d.layers or range(n_states or 0))}) or None
    if layers is None:
        raise click.UsageError(f"the layer count of {mopts.model} cannot be read from its config: give every "
                               "design explicit layers")
    options = {**mopts.as_dict(), "sets": list(sets), "wraps": list(wraps), "pools": list(pools), "shifts": list(shifts), "limit": limit,
               "pool_limit": pool_limit, "variants": variants, "seed": seed, "reads": reads, "states": layers,
               "designs": [d.as_dict() for d in chosen], "baseline": baseline, "max_new_tokens": max_new_tokens,
               "states_cache": None if states_cache is None else str(states_cache)}
    run = RunDir(out, "guard-crossval", options, free=("designs", "states_cache"))
    lazy = Lazy(lambda: load_for_recipe(mopts))
    from ..guard.states_cache import StatesCache

    cache = None if states_cache is None else StatesCache(states_cache)
    blocks = {s.name: _states_unit(run, lazy, s, reads, layers, variants if s.evaluate and s.train else 0,
                                   mopts.batch_size, cache, tokens=tokens, sentences=sentences)
              for s in sources}
    refusals = {s.name: _refusal_unit(run, lazy, s, max_new_tokens, mopts.batch_size)
                for s in evaluated} if baseline else {}
    from ..guard.crossval import GuardDesign, best_design, cross_validate, selected_rows

    result = cross_validate(blocks, chosen, progress=lambda msg: click.echo(f"fitting {msg}", err=True))
    rows = result.rows
    if sum(not d.is_control for d in chosen) > 1:  # the choice among designs, judged on sources it did not look at
        rows = rows + selected_rows(rows)
        chosen = [*chosen, GuardDesign(SELECTED)]
    rows = _with_baseline(rows, refusals, {s.name: s for s in evaluated})
    run.write_csv("crossval", [_flat(r) for r in rows])
    summary = _summary(rows, chosen, refusals)
    results = {"model": mopts.model, "designs": result.designs, "sources": [
        {"name": s.name, "label": s.label, "n": len(s.prompts), "evaluated": s.evaluate, "shift": not s.train}
        for s in sources], "rows": rows, "summary": summary, "pooled": result.pooled,
        "pooled_auc": result.pooled_auc, "shifts": result.shifts, "best_design": best_design(result.rows)}
    run.write_results(results)
    _plot(run, rows, chosen, evaluated, refusals)
    tables = crossval_tables(rows, chosen, evaluated, refusals, summary, result)
    for name, (title, columns, table) in tables.items():
        run.write_csv(name, [dict(zip(columns, r)) for r in table])
        print_table(title, columns, table)
    picks = [f"{r['source']}: {r['selected_design']}" for r in rows if r["design"] == SELECTED]
    if picks:
        click.echo(f"{SELECTED}: the design with the best worst accuracy on the other sources; " + "; ".join(picks),
                   err=True)
    emit(results, as_json)


def _check_folds_for_c(design, trainable: list) -> None:
    """A linear read-out without a fixed C chooses it by folds over its training sources, which
    need two sources of each label: refuse a split that leaves fewer now, not after the states
    are run (the text-only controls fall back to folds over prompts)."""
    if design.method != "linear" or design.C is not None:
        return
    for held in trainable:
        left = [s for s in trainable if s.origin != held.origin and design.fits_on(s.name, s.origin)]
        short = [("harmless", "harmful")[x] for x in (0, 1) if len({s.name for s in left if s.label == x}) < 2]
        if short:
            raise click.UsageError(
                f"design {design.name!r} chooses C by cross-validation over its training sources, and with "
                f"{held.name!r} left out fewer than two {' and '.join(short)} sources are left: give at least three "
                f"sources of each label (--set NAME=FILE:harmful / :harmless), or fix C in the design (C=1)")


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
                 batch_size: int, cache: Any = None, *, tokens: bool = False, sentences: bool = False):
    """The source's states (and its variants'), computed once and stored as safetensors; with
    ``tokens`` (a scan or sent design is compared) also every row's instruction-token states, in
    their own unit (``tokens_NAME``: all token rows end to end, and where each row's begin); with
    ``sentences`` (a sent design) where each row's sentences end, from its text's tokens."""
    import numpy as np
    import torch

    from ..guard.crossval import SourceStates, collect_source_states, row_sentence_ends
    from ..surface import ALL_EDITS, surface_variants

    def compute() -> dict[str, torch.Tensor]:
        loaded, fmt = lazy()
        b = collect_source_states(loaded.model, fmt, source, reads=reads, states=layers, n_variants=n_variants,
                                  batch_size=batch_size, progress=f"states of {source.name}", states_cache=cache,
                                  tokens=tokens)
        out = {"x": torch.from_numpy(b.x),
               "prompt": torch.tensor([p for p, _ in b.rows], dtype=torch.int64),
               "edit": torch.tensor([-1 if e is None else ALL_EDITS.index(e) for _, e in b.rows],
                                    dtype=torch.int64)}
        if tokens:
            out["tokens"] = torch.from_numpy(np.concatenate(b.tokens))
            out["offsets"] = torch.tensor(np.cumsum([0, *(len(t) for t in b.tokens)]), dtype=torch.int64)
        return out

    t = run.tensor_unit(f"{'tokens' if tokens else 'states'}_{source.name}", compute)
    rows = [(int(p), None if e < 0 else ALL_EDITS[e]) for p, e in zip(t["prompt"].tolist(), t["edit"].tolist())]
    texts = [source.prompts[p] if e is None else surface_variants(source.prompts[p], [e])[e] for p, e in rows]
    kept = None
    if tokens:
        flat, at = t["tokens"].numpy(), t["offsets"].tolist()
        kept = [flat[at[i]:at[i + 1]] for i in range(len(rows))]
    ends = None
    if sentences:
        try:
            ends = row_sentence_ends(lazy()[1], texts, kept)
        except ValueError as err:
            raise click.ClickException(f"{source.name}: {err}; choose another --out folder") from None
    return SourceStates(source=source, x=t["x"].numpy(), rows=rows, reads=tuple(reads), states=tuple(layers),
                        texts=texts, tokens=kept, ends=ends)


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


def _flat(row: dict) -> dict:
    """A crossval row for the CSV: nested figures as ``group.key`` columns."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict) and k != "surface_flips":
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _summary(rows: list[dict], designs, refusals) -> dict[str, dict]:
    """Per design, over the left-out sources (shift sources apart): the worst and mean accuracy,
    the largest flip rate, the mean accuracy on the other-language (shift) sources, on how many
    sources it beats the model's own refusal, and on how many its AUROC beats the ngram control's."""
    by = {(r["source"], r["design"]): r for r in rows}
    out = {}
    for d in designs:
        mine = [r for r in rows if r["design"] == d.name and not r.get("shift_source")]
        shifted = [r for r in rows if r["design"] == d.name and r.get("shift_source")]
        flips = [r["surface_flip_rate"] for r in mine if r["surface_flip_rate"] is not None]
        entry = {"min_accuracy": min(r["accuracy"] for r in mine),
                 "mean_accuracy": sum(r["accuracy"] for r in mine) / len(mine),
                 "max_surface_flip_rate": max(flips) if flips else None,
                 "mean_surface_flip_rate": sum(flips) / len(flips) if flips else None,
                 "shift_sources_mean_accuracy": (sum(r["accuracy"] for r in shifted) / len(shifted)
                                                 if shifted else None)}
        if refusals:
            entry["beats_refusal_on"] = sum(r["accuracy"] > r["refusal_baseline_accuracy"] for r in mine)
        if any(r["design"] == "ngram" for r in rows) and d.name != "ngram":
            both = [(r, by[(r["source"], "ngram")]) for r in mine + shifted if (r["source"], "ngram") in by]
            entry["auroc_beats_ngram_on"] = sum(r["auc_vs_other_class"] > c["auc_vs_other_class"] for r, c in both)
            entry["sources_compared_with_ngram"] = len(both)
        out[d.name] = entry
    return out


def crossval_tables(rows, designs, sources, refusals, summary, result) -> dict[str, tuple[str, list, list]]:
    """The run's tables, name -> (title, columns, rows of cells): ``table`` (accuracy and
    surface flips per source), ``auroc`` (each source against the other class, with recall at
    1% FPR), ``metrics`` (every held-out prompt pooled) and ``shifts`` (accuracy / AUROC on
    each shift)."""
    by = {(r["source"], r["design"]): r for r in rows}
    names = [d.name for d in designs]

    def pct(v) -> str:
        return "" if v is None or v != v else f"{100 * v:.1f}"

    def ci(pair) -> str:
        return "" if not pair else f" [{100 * pair[0]:.0f}-{100 * pair[1]:.0f}]"

    def kind(s) -> str:
        return f"{s.name} ({'harmful' if s.label else 'harmless'}{', shift' if not s.train else ''})"

    columns = ["held-out source", "n"] + (["refusal"] if refusals else []) + names
    acc = []
    for s in sources:
        first = by[(s.name, names[0])]
        acc.append([kind(s), str(first["n"]),
                    *([pct(first.get("refusal_baseline_accuracy"))] if refusals else []),
                    *[pct(by[(s.name, n)]["accuracy"]) + ("" if by[(s.name, n)]["surface_flip_rate"] is None
                                                          else f" ({pct(by[(s.name, n)]['surface_flip_rate'])})")
                      for n in names]])
    acc.append(["worst left-out source", "", *([""] if refusals else []),
                *[pct(summary[n]["min_accuracy"]) for n in names]])
    acc.append(["mean over left-out sources", "", *([""] if refusals else []),
                *[pct(summary[n]["mean_accuracy"]) for n in names]])
    if refusals:
        acc.append(["sources above the refusal baseline", "", "",
                    *[f"{summary[n]['beats_refusal_on']} of {len(sources)}" for n in names]])
    if any("auroc_beats_ngram_on" in summary[n] for n in names):
        acc.append(["sources where its AUROC beats ngram's", "", *([""] if refusals else []),
                    *[f"{summary[n]['auroc_beats_ngram_on']} of {summary[n]['sources_compared_with_ngram']}"
                      if "auroc_beats_ngram_on" in summary[n] else "" for n in names]])
    auroc = [[kind(s), str(by[(s.name, names[0])]["n"]),
              *[f"{by[(s.name, n)]['vs_other_class']['auroc']:.3f} / "
                f"{pct(by[(s.name, n)]['vs_other_class']['tpr_at_1pct_fpr'])}" for n in names]] for s in sources]
    metric_cols = ["design", "accuracy", "precision", "recall", "F1", "FPR", "AUROC", "AUPRC", "TPR@1%FPR",
                   "TPR@5%FPR"]
    metrics = []
    for n in names:
        m = result.pooled.get(n)
        if m is None:
            continue
        c = m.get("ci", {})
        metrics.append([n, pct(m["accuracy"]) + ci(c.get("accuracy")), pct(m["precision"]), pct(m["recall"]),
                        pct(m["f1"]) + ci(c.get("f1")), pct(m["fpr"]) + ci(c.get("fpr")),
                        f"{m['auroc']:.3f}" + ("" if "auroc" not in c else f" [{c['auroc'][0]:.3f}-{c['auroc'][1]:.3f}]"),
                        f"{m['auprc']:.3f}", pct(m["tpr_at_1pct_fpr"]) + ci(c.get("tpr_at_1pct_fpr")),
                        pct(m["tpr_at_5pct_fpr"])])
    shift_names = list(dict.fromkeys(r["shift"] for r in result.shifts))
    sh = {(r["shift"], r["design"]): r for r in result.shifts}
    shifts = [[e, str(sh[(e, names[0])]["n"]) if (e, names[0]) in sh else "",
               *[f"{pct(sh[(e, n)]['accuracy'])} / {sh[(e, n)]['auroc']:.3f}" if (e, n) in sh else "" for n in names]]
              for e in shift_names]
    out = {"table": ("accuracy % (surface flips %) on each source, by a guard fitted without it", columns, acc),
           "auroc": ("AUROC against every held-out prompt of the other class / recall % at 1% FPR",
                     ["held-out source", "n", *names], auroc),
           "metrics": ("every held-out prompt pooled (95% bootstrap intervals)", metric_cols, metrics)}
    if shifts:
        out["shifts"] = ("accuracy % / AUROC on shifted held-out prompts", ["shift", "n", *names], shifts)
    return out


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
