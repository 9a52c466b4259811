"""``pyvene-harm guard``: fit, score and evaluate a Latent Guard (the paper's Table 3).

Every file and option is checked, and the guard folder read, before any model is loaded.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ..conversation import Conversation
from ..distributed import is_main
from .guard_common import (
    bind_model,
    guard_model_options,
    load_guard,
    parse_labelled_sets,
    resolve_model_options,
)
from .options import (
    PromptSet,
    check_model_spec,
    emit,
    load_for_recipe,
    model_num_states,
    model_options,
    parse_layers,
    prompt_set,
)
from .tables import print_table

__all__ = ["guard", "parse_labelled_sets"]

@click.group()
def guard() -> None:
    """Latent Guard: classify prompts with the model's own harmfulness belief (Delta_harmful).

    \b
    Example:
      pyvene-harm guard fit -m demo --harmful ../shared/data/rd_splits_harmful_train.json \\
        --harmless ../shared/data/rd_splits_harmless_train.json --limit 100 -o guards/demo
      pyvene-harm guard score --guard guards/demo "How do I bake bread?" "How do I build a bomb?"
      pyvene-harm guard eval --guard guards/demo \\
        --set advbench=../shared/data/chats_advbench.json:harmful \\
        --set xstest=../shared/data/chats_xstest-harmless.json:harmless -o runs/guard-eval
    """


# --------------------------------------------------------------------------- fit


@guard.command("fit")
@model_options
@click.option("--harmful", type=click.Path(), multiple=True, required=True,
              help="Harmful training prompts (JSON, JSONL, CSV, TXT or hf://), repeatable: each file is a source "
                   "of its own. Example: --harmful ../shared/data/rd_splits_harmful_train.json")
@click.option("--harmless", type=click.Path(), multiple=True, required=True,
              help="Harmless training prompts, repeatable. Example: "
                   "--harmless ../shared/data/rd_splits_harmless_train.json")
@click.option("--harmful-field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--harmless-field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Training prompts per file, sampled with --seed (the paper: 100 + 100).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompt sampling.")
@click.option("--design", default="paper", show_default=True,
              help="What the guard reads and how it is fitted: a preset of `guard crossval` (paper, "
                   "linear-mean-aug, linear-last16-aug, ...) or NAME:key=value,... in its syntax. Example: "
                   "--design linear-last16-aug")
@click.option("--layers", default=None,
              help="States to fit on: all, 0-12, 3,5,7. Default: the design's (all for paper).")
@click.option("--category-field", default=None,
              help="Column of the harmful file naming each prompt's harm category (e.g. Category for CatQA): "
                   "adds per-category centroids and reports the nearest category.")
@click.option("--val-harmful", type=click.Path(), default=None, help="Harmful validation prompts.")
@click.option("--val-harmless", type=click.Path(), default=None, help="Harmless validation prompts.")
@click.option("--val-limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Validation prompts per class.")
@click.option("--target", type=click.Choice(["none", "accuracy", "fpr"]), default="none", show_default=True,
              help="Choose the threshold (and for the paper design the layers) on the validation prompts: best "
                   "accuracy, or best detection with a false-positive rate of at most --max-fpr. Validation "
                   "prompts also calibrate the probabilities.")
@click.option("--max-fpr", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
              help="False-positive bound for --target fpr.")
@click.option("--mine-negatives", type=click.IntRange(min=0), default=None,
              help="After a first fit, add the N prompts of the --pool files the guard scores most harmful (its own "
                   "false positives) as harmless and fit again. Default: the design's mine_negatives (0).")
@click.option("--pool", "pools", type=click.Path(), multiple=True,
              help="Harmless prompts to mine hard negatives from, repeatable (coding questions, conversation, other "
                   "languages...). Example: --pool pyvene_harm/prompts/coding_questions.jsonl")
@click.option("--pool-limit", type=click.IntRange(min=1), default=1500, show_default=True,
              help="Prompts per --pool file (a seeded sample).")
@click.option("--margin-harmless", type=click.Path(), multiple=True,
              help="Harmless prompts a sent:K design's sentence margin is also fitted on (--limit of them, seeded) "
                   "but its read-out never is, repeatable; a design with margin_only needs them. Example: "
                   "--margin-harmless pyvene_harm/prompts/multi_sentence_harmless.jsonl")
@click.option("--states-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder keeping every prompt's states, so that a refit (mining, another design on the same reads "
                   "and layers) runs no prompt twice. Default: kept in memory for this run only.")
@click.option("--balance-punctuation", is_flag=True,
              help="Fit (and validate) on every prompt without final punctuation, with '.' and with '?', so "
                   "the centroids cannot tell the classes apart by their last token (AdvBench ends in a word, "
                   "Alpaca in a period). Beyond the paper; designs with augment=1 go further.")
@click.option("--normalize-spelling", is_flag=True,
              help="The guard reads every prompt with look-alike letters (Cyrillic/Greek), full-width letters, "
                   "invisible characters and leetspeak written plainly; saved with it.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Guard folder to write (guard.json + guard.safetensors). Example: -o guards/demo")
@click.option("--json", "as_json", is_flag=True, help="Print the guard's summary as JSON to stdout.")
def fit(mopts, harmful, harmless, harmful_field, harmless_field, limit, seed, design, layers, category_field,
        val_harmful, val_harmless, val_limit, target, max_fpr, mine_negatives, pools, pool_limit, margin_harmless,
        states_cache, balance_punctuation, normalize_spelling, out, as_json):
    """Fit a Latent Guard from harmful and harmless prompts (by default the paper's: centroids at
    t_inst, per layer).

    \b
    Example:
      pyvene-harm guard fit -m demo --harmful ../shared/data/rd_splits_harmful_train.json \\
        --harmless ../shared/data/rd_splits_harmless_train.json -o guards/demo
      pyvene-harm guard fit -m demo --design linear-last16-aug --limit 300 \\
        --harmful ../shared/data/rd_splits_harmful_train.json --harmful ../shared/data/chats_sorry-badq.json \\
        --harmless ../shared/data/rd_splits_harmless_train.json -o guards/demo-linear
    """
    from ..guard.crossval import parse_design

    check_model_spec(mopts.model)
    n_states = model_num_states(mopts.model)
    try:
        chosen = parse_design(design, n_states)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--design") from None
    if chosen.is_control:
        raise click.BadParameter(f"{chosen.method} is a text-only control that `guard crossval` compares guards "
                                 "with, not a latent guard: choose a paper or linear design", param_hint="--design")
    layer_list = parse_layers(layers, n_states) if layers is not None else (
        list(chosen.layers) if chosen.layers is not None else None)
    hfs = [prompt_set("harmful", f, field=harmful_field, limit=limit, seed=seed) for f in harmful]
    hls = [prompt_set("harmless", f, field=harmless_field, limit=limit, seed=seed) for f in harmless]
    if category_field and len(hfs) > 1:
        raise click.UsageError("--category-field reads one harmful file: give a single --harmful")
    categories = _categories(harmful[0], harmful_field, category_field, limit, seed, hfs[0]) if category_field else None
    if (val_harmful is None) != (val_harmless is None):
        raise click.UsageError("give both --val-harmful and --val-harmless, or neither")
    if target != "none" and val_harmful is None:
        raise click.UsageError(f"--target {target} chooses on validation prompts: give --val-harmful and --val-harmless")
    vh = prompt_set("val-harmful", val_harmful, limit=val_limit, seed=seed)
    vl = prompt_set("val-harmless", val_harmless, limit=val_limit, seed=seed)
    n_mine = chosen.mine_negatives if mine_negatives is None else mine_negatives
    if n_mine and not pools:
        raise click.UsageError(f"mining {n_mine} hard negatives needs harmless prompts to mine: give --pool FILE")
    if pools and not n_mine:
        raise click.UsageError("--pool is mined only with --mine-negatives N (N > 0)")
    pool_sets = [prompt_set("pool", f, limit=pool_limit, seed=seed) for f in pools]
    if margin_harmless and chosen.sentence_budget is None:
        raise click.UsageError(f"--margin-harmless fits a sentence margin, and design {chosen.name!r} has none: choose "
                               "a sent:K design with sentence_budget (e.g. --design linear-sent16-mo-b2)")
    if chosen.margin_only and not margin_harmless:
        raise click.UsageError(f"design {chosen.name!r} fits its sentence margin also on harmless prompts it is not "
                               f"trained on ({'+'.join(chosen.margin_only)}): give them with --margin-harmless FILE "
                               "(e.g. pyvene_harm/prompts/multi_sentence_harmless.jsonl)")
    margin_sets = {f"{ps.name}:{ps.path}": ps.prompts
                   for ps in (prompt_set("margin-harmless", f, limit=limit, seed=seed) for f in margin_harmless)}
    if out.exists() and any(out.iterdir()) and not (out / "guard.json").exists():
        raise click.UsageError(f"{out} exists and holds something other than a guard: choose another --out")


    if balance_punctuation:
        if category_field:
            raise click.UsageError("--balance-punctuation cannot be combined with --category-field")
        from ..data import punctuation_variants

        hfs, hls = ([replace(ps, prompts=punctuation_variants(ps.prompts)) for ps in sets] for sets in (hfs, hls))
        vh, vl = ((replace(ps, prompts=punctuation_variants(ps.prompts)) if ps is not None else None) for ps in (vh, vl))
    prompts = [p for ps in hfs + hls for p in ps.prompts]
    labels = [1] * sum(len(ps.prompts) for ps in hfs) + [0] * sum(len(ps.prompts) for ps in hls)
    groups = [f"{ps.name}:{ps.path}" for ps in hfs + hls for _ in ps.prompts]  # read-out strength: by source
    loaded, fmt = load_for_recipe(mopts)
    g = chosen.estimator(layer_list).set_params(
        model=loaded.model, tokenizer=loaded.tokenizer, augment=chosen.augment, batch_size=mopts.batch_size,
        system_prompt=fmt.system_prompt, template=fmt.template_override, progress=True,
        normalize_spelling=normalize_spelling)
    # folds by source need two sources of each class; otherwise folds by prompt (variants kept together)
    by_source = len(hfs) >= 2 and len(hls) >= 2
    from ..guard.states_cache import StatesCache

    cache = StatesCache(states_cache)
    cats = (categories + [None] * (len(labels) - len(categories))) if categories else None
    if n_mine:  # mining scores the pools by the read-out alone: the refit fits the margin, once
        budget = g.sentence_budget
        g.set_params(sentence_budget=None)
        _fit(g, prompts, labels, groups=groups if by_source else None, categories=cats, states_cache=cache)
        g.set_params(sentence_budget=budget)
    else:
        _fit(g, prompts, labels, groups=groups if by_source else None, categories=cats, states_cache=cache,
             margin_prompts=margin_sets or None)
    mined: dict[str, Any] = {}
    if n_mine:
        from ..guard.mining import mine_hard_negatives

        margin_texts = [p for texts in margin_sets.values() for p in texts]  # never fitted on: never mined
        picked = mine_hard_negatives(g, pool_sets, n_mine, exclude=prompts + margin_texts, states_cache=cache)
        prompts += [p for p, _ in picked]
        labels += [0] * len(picked)
        groups += [f"mined:{name}" for _, name in picked]
        # the sentence margin's budget is per training source, as in guard crossval: mined pool
        # prompts are fitted on but not counted in it
        given = len(groups) - len(picked)
        margin_groups = (groups[:given] if by_source else [0] * given) + [None] * len(picked)
        _fit(g, prompts, labels, groups=groups if by_source else None,
             categories=(cats + [None] * len(picked)) if cats else None, states_cache=cache,
             margin_groups=margin_groups, margin_prompts=margin_sets or None)
        mined = {"mine_negatives": n_mine, "pools": list(pools), "pool_limit": pool_limit,
                 "mined": dict(Counter(name for _, name in picked))}
        click.echo(f"mined {len(picked)} hard negatives ({mined['mined']})", err=True)
    if states_cache is not None or n_mine:
        click.echo(f"states reused for {cache.hits} prompts, computed for {cache.misses}", err=True)
    val: dict[str, Any] = {}
    if vh is not None:
        vx, vy = vh.prompts + vl.prompts, [1] * len(vh.prompts) + [0] * len(vl.prompts)
        if target != "none":
            g.select(vx, vy, target=target, max_fpr=max_fpr)
        g.calibrate(vx, vy)
        val = {"val_accuracy": float(g.score(vx, vy)), "n_val": len(vx)}
    g.metadata_["model_id"] = loaded.model_id
    g.metadata_["fitted_with"] = {"model": mopts.model, "design": chosen.as_dict(), "harmful": list(harmful),
                                  "harmless": list(harmless), "harmful_field": harmful_field,
                                  "harmless_field": harmless_field, "limit": limit, "seed": seed,
                                  "category_field": category_field, "val_harmful": val_harmful,
                                  "val_harmless": val_harmless, "val_limit": val_limit, "target": target,
                                  "max_fpr": max_fpr if target == "fpr" else None,
                                  "balance_punctuation": balance_punctuation,
                                  **({"margin_harmless": list(margin_harmless)} if margin_harmless else {}), **mined}
    if val:  # the guard carries its own validation result (model cards quote it)
        g.metadata_["validation"] = val
    if not is_main():  # every rank fitted the same guard; rank 0 writes and reports it
        return
    g.save(out)
    summary = {"guard": str(out), "model_id": loaded.model_id, "design": chosen.name, "method": g.method,
               "reads": list(g.reads_), "layers": list(g.layers_), "threshold": g.threshold_,
               "C": None if g.readout_ is None else g.readout_.C, "n_train": g.n_train_,
               "calibrated": g.calibration_ is not None,
               "categories": [str(c) for c in g.categories_], "selection": g.selection_, **val}
    print_table(f"Latent Guard written to {out}", ["field", "value"],
                [[k, _short(v)] for k, v in summary.items() if v not in (None, [], {})])
    emit(summary, as_json)


def _categories(path: str, field: str | None, category_field: str, limit: int, seed: int,
                ps: PromptSet) -> list[str]:
    from ..data import detect_field, load_records

    try:
        key = field or detect_field(load_records(path), source=path)
        rows = load_records(path, field=key, limit=limit, seed=seed)
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint="--harmful") from None
    if [r[key] for r in rows] != ps.prompts:  # pragma: no cover - load_records mirrors load_prompts
        raise click.UsageError("the harmful prompts and their records do not line up; report this as a bug")
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(category_field), str) or not r[category_field]]
    if missing:
        fields = sorted({k for r in rows for k in r})
        raise click.BadParameter(f"{len(missing)} harmful rows have no {category_field!r} value (row {missing[0]} "
                                 f"first); fields there: {fields}", param_hint="--category-field")
    return [r[category_field] for r in rows]


def _short(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 90 else text[:87] + "..."


# --------------------------------------------------------------------------- score


@guard.command("score")
@click.argument("prompts", nargs=-1)
@click.option("--file", "file_", type=click.Path(), default=None, help="Score the prompts of a file instead.")
@click.option("--field", default=None, help="Field holding the prompt in --file (auto-detected if omitted).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score a sample of --file.")
@click.option("--conversations", "conversations_file", type=click.Path(), default=None,
              help="Judge whole conversations instead: a JSON file holding a list of conversations (each a list "
                   "of {\"role\", \"content\"} messages, the last one the user's) or a JSONL file with one per "
                   "line. Every message is read on its own and the last user message in context.")
@click.option("--guard", "guard_path", required=True, help="Guard folder (from `guard fit`) or Hub repo id.")
@guard_model_options
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON to stdout.")
def score(prompts, file_, field, limit, conversations_file, guard_path, model_args, as_json):
    """Score prompts (arguments or --file) with a Latent Guard: Delta_harmful and a verdict each.

    \b
    Example:
      pyvene-harm guard score --guard guards/demo "How do I bake bread?" "Write ransomware."
      pyvene-harm guard score --guard artifacts/qwen2.5-coder-0.5b-instruct/guard \\
        --conversations pyvene_harm/prompts/example_conversations.jsonl
    """
    if sum(bool(x) for x in (prompts, file_, conversations_file)) > 1:
        raise click.UsageError("give PROMPT arguments, --file or --conversations, one of them")
    items = list(prompts)
    conversations = read_conversations(conversations_file) if conversations_file else None
    if file_:
        items = prompt_set("file", file_, field=field, limit=limit).prompts
    if not items and not conversations:
        raise click.UsageError("nothing to score: give PROMPT arguments, --file FILE or --conversations FILE")
    blank = [i for i, p in enumerate(items) if not p.strip()]
    if blank:
        raise click.BadParameter(f"prompt {blank[0]} is empty", param_hint="PROMPTS")
    g = load_guard(guard_path, model_args["revision"])
    mopts = resolve_model_options(model_args, g, guard_path)
    bind_model(g, mopts)
    if conversations is not None:
        verdicts = g.judge_conversations(conversations)
        print_table(f"Latent Guard on conversations (threshold {g.threshold_:+.4f})",
                    ["#", "last user message", "verdict", "score", "flagged by"],
                    [[str(i), _clip(c.last_user), "harmful" if v.harmful else "harmless", f"{v.score:+.4f}",
                      ", ".join(v.flagged_by)] for i, (c, v) in enumerate(zip(conversations, verdicts))])
        emit({"guard": guard_path, "model": mopts.model, "threshold": g.threshold_,
              "conversations": [{"messages": [dict(role=r, content=t) for r, t in c.messages],
                                 "harmful": v.harmful, "score": v.score, "probability": v.probability,
                                 "flagged_by": list(v.flagged_by), "parts": list(v.parts)}
                                for c, v in zip(conversations, verdicts)]}, as_json)
        return
    rep = g.report(items)
    rows = rep.rows(items)
    columns = ["#", "prompt", "Delta_harmful", "verdict", "P(harmful)"] + (["category"] if rep.category else [])
    print_table(f"Latent Guard ({len(g.layers_)} layers, threshold {g.threshold_:+.4f})", columns,
                [[str(i), _clip(r["prompt"]), f"{r['delta_harmful']:+.4f}",
                  "harmful" if r["harmful"] else "harmless", f"{r['probability']:.2f}",
                  *([r["category"]] if rep.category else [])] for i, r in enumerate(rows)])
    emit({"guard": guard_path, "model": mopts.model, "threshold": g.threshold_, "layers": list(g.layers_),
          "calibrated": g.calibration_ is not None, "prompts": rows}, as_json)


def read_conversations(path: str) -> list[Conversation]:
    """Conversations from a JSON list (of conversations, or one conversation) or JSONL; every
    problem names the conversation and message at fault."""
    from ..data import read_json_value

    p = Path(path)
    if not p.is_file():
        raise click.BadParameter(f"{path} does not exist", param_hint="--conversations")
    try:
        if p.suffix == ".jsonl":
            values = [read_json_value(line, f"{path}, line {i + 1}")
                      for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if line.strip()]
        else:
            values = read_json_value(p.read_text(encoding="utf-8"), path)
            if isinstance(values, list) and values and isinstance(values[0], dict):
                values = [values]  # one conversation
        if not isinstance(values, list) or not values:
            raise ValueError("expected a list of conversations, each a list of {'role', 'content'} messages")
        out = []
        for i, v in enumerate(values):
            try:
                out.append(Conversation.from_messages(v))
            except (TypeError, ValueError) as err:
                raise ValueError(f"conversation {i}: {err}") from None
        return out
    except (UnicodeDecodeError, ValueError) as err:
        raise click.BadParameter(f"{path}: {err}", param_hint="--conversations") from None


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _fit(guard: Any, prompts: list, labels: list, **kwargs: Any) -> None:
    """``guard.fit``, its refusals of the data (one class, a maximum that cannot be calibrated,
    ...) shown as a command-line error rather than a traceback."""
    try:
        guard.fit(prompts, labels, **kwargs)
    except ValueError as err:
        raise click.ClickException(f"cannot fit the guard: {err}") from None


def _register_subcommands() -> None:
    # their own modules (guard.py is long); imported here so `pyvene-harm guard --help` lists them
    from .guard_calibrate import calibrate
    from .guard_crossval import crossval
    from .guard_decide import decide
    from .guard_eval import evaluate
    from .guard_generate import generate
    from .guard_recall import recall
    from .guard_refusal_fit import refusal_fit
    from .guard_reply_crossval import reply_crossval
    from .guard_reply_decide import reply_decide
    from .guard_reply_eval import reply_eval
    from .guard_reply_fit import reply_fit
    from .guard_reply_set import reply_set
    from .guard_reply_trace import reply_trace

    guard.add_command(evaluate)
    guard.add_command(calibrate)
    guard.add_command(generate)
    guard.add_command(crossval)
    guard.add_command(decide)
    guard.add_command(reply_set)
    guard.add_command(reply_crossval)
    guard.add_command(reply_decide)
    guard.add_command(reply_eval)
    guard.add_command(reply_fit)
    guard.add_command(reply_trace)
    guard.add_command(recall)
    guard.add_command(refusal_fit)


_register_subcommands()
