"""``pyvene-harm guard recall``: recall on plain harmful requests, category by category.

Scores every prompt of the harmful files (CatQA's ``Category``/``Subcategory``, SORRY-Bench's
numbered ``category``) and of ordinary traffic, then reports per category the share flagged at the
guard's own threshold and at the threshold that flags ``--traffic-flag-rate`` of the traffic.
``--exclude GUARD_FOLDER`` drops the prompts the guard was fitted on, so the figures are held out
(in-distribution: the rest of a training source is still that source).
"""

from __future__ import annotations

from pathlib import Path

import click

from .guard_common import (
    Lazy,
    bind_model,
    exclude_option,
    guard_fingerprint,
    guard_model_options,
    load_guard,
    resolve_model_options,
)
from .options import emit
from .rundir import RunDir
from .tables import print_table

__all__ = ["recall"]

_AUTO_FIELDS = (("Category", "Subcategory"), ("category",))


@click.command("recall")
@click.option("--guard", "guard_path", required=True, help="Guard folder (from `guard fit`) or Hub repo id.")
@guard_model_options
@click.option("--harmful", multiple=True, required=True, type=click.Path(),
              help="Harmful prompts with a category column (file or folder; repeatable). "
                   "Example: --harmful ../shared/data/catqa --harmful ../shared/data/chats_sorry-badq.json")
@click.option("--category-field", "category_fields", multiple=True,
              help="Column(s) naming a prompt's category; each gives its own rows (default: Category and "
                   "Subcategory where present, else category).")
@click.option("--traffic", multiple=True, required=True, type=click.Path(),
              help="Ordinary, harmless traffic; sets the second threshold (repeatable). Example: --traffic "
                   "pyvene_harm/prompts/example_traffic.jsonl --traffic ../shared/data/rd_splits_harmless_val.json")
@click.option("--traffic-limit", type=click.IntRange(min=1), default=None,
              help="A seeded sample of this many prompts from each --traffic file (default: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --traffic-limit's sample.")
@click.option("--traffic-flag-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Share of the traffic the second threshold may flag.")
@exclude_option
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (config.json, results.json, categories.csv, misses.csv, summary.md).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def recall(guard_path, model_args, harmful, category_fields, traffic, traffic_limit, seed, traffic_flag_rate, exclude, out,
           as_json):
    """Recall of plain harmful requests by category, at the guard's threshold and at a share of
    ordinary traffic flagged.

    \b
    Example:
      pyvene-harm guard recall --guard artifacts/qwen2.5-coder-0.5b-instruct/guard \\
        --harmful ../shared/data/catqa --harmful ../shared/data/chats_sorry-badq.json \\
        --traffic pyvene_harm/prompts/example_traffic.jsonl --traffic ../shared/data/rd_splits_harmless_val.json \\
        --traffic-limit 1000 --exclude artifacts/qwen2.5-coder-0.5b-instruct/guard -o runs/recall
    """
    from ..guard.recall import recall_by_category

    exclude_files, excluded = exclude
    skip = set(excluded)
    sources, dropped = {}, 0
    for path in harmful:
        prompts, labels, n_dropped = _categorised(path, category_fields, skip)
        sources[path], dropped = (prompts, labels), dropped + n_dropped
    from .options import prompt_set

    traffic_sets = [prompt_set("traffic", path, limit=traffic_limit, seed=seed, exclude=excluded) for path in traffic]
    g = load_guard(guard_path, model_args["revision"])
    mopts = resolve_model_options(model_args, g, guard_path)
    run = RunDir(out, "guard-recall", {**mopts.as_dict(), "guard": guard_path,
                                       "guard_fingerprint": guard_fingerprint(guard_path, model_args["revision"]),
                                       "harmful": list(harmful), "category_fields": list(category_fields),
                                       "traffic": list(traffic), "traffic_limit": traffic_limit, "seed": seed,
                                       "traffic_flag_rate": traffic_flag_rate,
                                       "exclude": exclude_files})
    lazy = Lazy(lambda: bind_model(g, mopts))

    def scores(name: str, prompts: list[str]) -> list[float]:
        def compute() -> list[float]:
            lazy()
            return [float(v) for v in g.decision_function(prompts)]

        return run.unit(f"scores:{name}", compute)

    traffic_scores = [v for ps in traffic_sets for v in scores(f"traffic:{ps.path}", ps.prompts)]
    all_scores, keys, misses, by_source = [], [], [], {}
    for path, (prompts, labels) in sources.items():
        got = by_source[Path(path).name] = scores(f"harmful:{path}", prompts)
        for prompt, score, cats in zip(prompts, got, labels):
            for field, category in cats:
                all_scores.append(score)
                keys.append((f"{Path(path).name} [{field}]", category))
            if score <= g.threshold_:
                misses.append({"source": Path(path).name, "category": " / ".join(c for _, c in cats),
                               "score": round(score, 3), "prompt": prompt})
    result = recall_by_category(all_scores, keys, threshold=g.threshold_, traffic_scores=traffic_scores,
                                traffic_flag_rate=traffic_flag_rate)
    n_prompts = sum(len(p) for p, _ in sources.values())
    result.update({"guard": guard_path, "threshold": g.describe_threshold(), "n_harmful_prompts": n_prompts,
                   "n_excluded": dropped, "overall": _overall(by_source, result["thresholds"])})
    run.write_csv("categories", result["rows"])
    run.write_csv("misses", sorted(misses, key=lambda r: r["score"]))
    run.write_results({k: v for k, v in result.items() if k != "rows"})
    _summary(run, result, traffic_flag_rate)
    pct = f"{round(100 * traffic_flag_rate, 2):g}pct"
    print_table(f"recall by category (worst 15 of {len(result['rows'])}), {n_prompts} harmful prompts",
                ["source", "category", "n", "recall", f"at {traffic_flag_rate:.0%} traffic"],
                [[r["source"], r["category"], str(r["n"]), f"{r['recall']:.2f}", f"{r[f'recall_at_{pct}_traffic']:.2f}"]
                 for r in result["rows"][:15]])
    emit({k: v for k, v in result.items() if k != "rows"}, as_json)


def _categorised(path: str, fields: tuple[str, ...],
                 skip: set[str]) -> tuple[list[str], list[list[tuple[str, str]]], int]:
    """Prompts of a harmful source (minus ``skip``) with their (field, category) labels, and how
    many ``skip`` dropped."""
    from ..data import detect_field, load_records, prompt_files
    from ..guard.recall import category_name

    prompts, labels, dropped = [], [], 0
    for file in prompt_files(path) or [path]:
        try:
            rows = load_records(file)
            key = detect_field(rows, source=file)
        except (ValueError, OSError) as err:
            raise click.BadParameter(str(err), param_hint="--harmful") from None
        use = list(fields) or next((list(f) for f in _AUTO_FIELDS if all(f[0] in r for r in rows)), [])
        if not use:
            raise click.BadParameter(f"{file}: no category column found (looked for Category, category): "
                                     "name it with --category-field", param_hint="--harmful")
        for r in rows:
            text = r.get(key)
            if not isinstance(text, str) or not text.strip():
                continue
            if text in skip:
                dropped += 1
                continue
            cats = [(f, category_name(r[f], path)) for f in use if r.get(f) not in (None, "")]
            if not cats:
                raise click.BadParameter(f"{file}: a row has none of {use} (fields there: {sorted(r)})",
                                         param_hint="--category-field")
            prompts.append(text)
            labels.append(cats)
    if not prompts:
        raise click.BadParameter(f"{path}: no prompts left after --exclude", param_hint="--harmful")
    return prompts, labels, dropped


def _overall(by_source: dict[str, list[float]], thresholds: dict[str, float]) -> dict:
    """Each source's recall counted once per prompt (a prompt with two category columns is in two rows)."""
    return {name: {"n": len(s), **{f"recall_at_{k}": sum(v > t for v in s) / len(s) for k, t in thresholds.items()}}
            for name, s in by_source.items()}


def _summary(run: RunDir, result: dict, rate: float) -> None:
    pct = f"{round(100 * rate, 2):g}pct"
    t = result["thresholds"]
    lines = [f"# Recall by category: {result['guard']}", "",
             f"{result['n_harmful_prompts']} harmful prompts ({result['n_excluded']} more of these files were training "
             "prompts of the guard, left out); "
             f"guard {result['threshold']}; second threshold {t[f'{pct}_traffic']:+.3f} flags at most {rate:.0%} of "
             f"{result['traffic']['n']} ordinary prompts (the guard's own threshold flags "
             f"{result['traffic']['flagged_at_guard_threshold']:.1%} of them).", "",
             "| source | prompts | recall | at traffic threshold |", "|---|---:|---:|---:|"]
    for name, o in result["overall"].items():
        lines.append(f"| {name} | {o['n']} | {o['recall_at_guard']:.3f} | {o[f'recall_at_{pct}_traffic']:.3f} |")
    lines += ["", "Every category, worst first (95% Wilson intervals):", "",
              "| source [column] | category | n | recall | at traffic threshold | median score |",
              "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['source']} | {r['category']} | {r['n']} | {r['recall']:.2f} "
                     f"[{r['recall_low']:.2f}, {r['recall_high']:.2f}] | {r[f'recall_at_{pct}_traffic']:.2f} "
                     f"[{r[f'recall_at_{pct}_traffic_low']:.2f}, {r[f'recall_at_{pct}_traffic_high']:.2f}] | "
                     f"{r['median_score']:+.2f} |")
    if run.writes:
        from ..io_utils import atomic_write_bytes

        atomic_write_bytes(run.path / "summary.md", ("\n".join(lines) + "\n").encode())
