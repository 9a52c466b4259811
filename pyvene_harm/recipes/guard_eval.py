"""``pyvene-harm guard eval``: a guard's accuracy per labelled prompt set, beside the model's own
refusal (the paper's Table 3), a generative guard and edited copies of every set."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from ..guard.metrics import AGAINST_KEYS, per_set_metrics
from ..surface import ALL_EDITS, surface_variants
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
from .options import (
    ModelOptions,
    PromptSet,
    check_model_spec,
    emit,
)
from .rundir import RunDir
from .tables import print_table

__all__ = ["evaluate"]


@click.command("eval")
@click.option("--guard", "guard_path", required=True, help="Guard folder (from `guard fit`) or Hub repo id.")
@guard_model_options
@labelled_sets_option
@exclude_option
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Prompts per set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompt sampling.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also judge each prompt by the model's own refusal (greedy reply + keyword judge), "
                   "the paper's refusal-as-guard baseline.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated per prompt for the refusal baseline (the release judged 128).")
@click.option("--generative-guard", "generative", default=None,
              help="Also classify with a guard LM in Llama Guard 3's format (Hub id, folder or .gguf), "
                   "e.g. meta-llama/Llama-Guard-3-8B.")
@click.option("--edit", "edits", multiple=True, type=click.Choice(ALL_EDITS),
              help="Also score every set with this edit made to each prompt, as a set NAME+EDIT (repeatable): "
                   "surface edits (strip, dot, question, case) or shifts (typos, leet, spacing, homoglyph).")
@click.option("--normalize-spelling/--as-sent", "spelling", default=None,
              help="Read prompts with look-alike letters, full-width letters, invisible characters and leetspeak "
                   "written plainly (or exactly as sent), whatever the guard was saved with. Default: as saved.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (config.json, results.json, eval.csv, predictions.csv); re-running resumes.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def evaluate(guard_path, model_args, sets, exclude, limit, seed, baseline, max_new_tokens, generative, edits,
             spelling, out, as_json):
    """Accuracy of the guard per labelled prompt set, beside the refusal baseline (Table 3).

    \b
    Example:
      pyvene-harm guard eval --guard guards/demo -o runs/guard-eval \\
        --set jbb=../shared/data/rd_processed_jailbreakbench.json:harmful \\
        --set templates=../shared/data/chats_human-seed-50-adv.json:harmful \\
        --set xstest=../shared/data/chats_xstest-harmless.json:harmless
    """
    loaded_sets = labelled_prompt_sets(sets, exclude, limit=limit, seed=seed)
    loaded_sets += [(replace(ps, name=f"{ps.name}+{e}", prompts=[surface_variants(p, [e])[e] for p in ps.prompts]),
                     label) for e in edits for ps, label in list(loaded_sets)]
    g = load_guard(guard_path, model_args["revision"])
    if spelling is not None:
        g.set_params(normalize_spelling=spelling)
    mopts = resolve_model_options(model_args, g, guard_path)
    if generative is not None:
        check_model_spec(generative)
    options = {**mopts.as_dict(), "guard": guard_path,
               "guard_fingerprint": guard_fingerprint(guard_path, model_args["revision"]),
               "sets": list(sets), "exclude": exclude[0], "limit": limit, "seed": seed, "baseline": baseline,
               "max_new_tokens": max_new_tokens, "generative_guard": generative}
    # recorded when used, so runs made before these options existed resume as they were
    options.update({"edits": list(edits)} if edits else {})
    # whenever it is asked for or on: a run made --as-sent with a guard that reads plainly says so
    options.update({"normalize_spelling": bool(g.normalize_spelling)} if spelling is not None or g.normalize_spelling
                   else {})
    run = RunDir(out, "guard-eval", options)
    lazy = Lazy(lambda: bind_model(g, mopts))
    lazy_gen = Lazy(lambda: _generative(generative, mopts))
    summary, predictions, all_units = [], [], []
    for ps, label in loaded_sets:
        units = {"latent": run.unit(f"latent_{ps.name}", lambda ps=ps: _latent_unit(g, lazy, ps.prompts))}
        if baseline:
            units["baseline"] = run.unit(f"baseline_{ps.name}", lambda ps=ps: _baseline_unit(
                g, lazy, ps, max_new_tokens, mopts.batch_size))
        if generative is not None:
            units["generative"] = run.unit(f"generative_{ps.name}", lambda ps=ps: _generative_unit(
                lazy_gen, ps.prompts))
        summary.append(_set_summary(ps, label, units))
        all_units.append(units)
        predictions.extend(_prediction_rows(ps, label, units))
    scores = [(s["set"], int(s["label"] == "harmful"), _decisions(u, g, lazy, ps.prompts))
              for s, u, (ps, _) in zip(summary, all_units, loaded_sets)]
    per_set, pooled = per_set_metrics(scores)
    for s in summary:
        m = per_set[s["set"]]
        s.update({"accuracy_ci_low": 100 * m["accuracy_ci"][0], "accuracy_ci_high": 100 * m["accuracy_ci"][1],
                  **{f"{k}_vs_other_class": m[k] for k in AGAINST_KEYS}})
    run.write_csv("eval", summary)
    run.write_csv("predictions", predictions)
    results = {"guard": guard_path, "model": mopts.model, "model_id": g.metadata_.get("model_id"),
               "layers": list(g.layers_), "threshold": g.threshold_, "max_new_tokens": max_new_tokens,
               "headline": ("accuracy on the prompts where the model is wrong (harmful ones it accepts, harmless "
                            "ones it refuses), as Table 3 scores guards" if baseline else
                            "accuracy over the whole set (no refusal baseline: the model-wrong subset is unknown)"),
               "not_run": TABLE3_NOT_RUN, "sets": summary, "pooled": pooled}
    run.write_results(results)
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    if baseline:
        columns = ["set", "label", "model wrong n", "Latent Guard % (Table 3)", "refusal %", *(
            ["generative guard %"] if generative else []), "n", "Latent Guard % all", "refusal % all",
                   *(["generative % all"] if generative else [])]
        rows = [[s["set"], s["label"], str(s["n_model_wrong"]), pct(s["latent_guard_accuracy_where_model_wrong"]),
                 pct(s["refusal_baseline_accuracy_where_model_wrong"]),
                 *([pct(s["generative_guard_accuracy_where_model_wrong"])] if generative else []),
                 str(s["n"]), pct(s["latent_guard_accuracy"]), pct(s["refusal_baseline_accuracy"]),
                 *([pct(s["generative_guard_accuracy"])] if generative else [])] for s in summary]
        title = (f"guard accuracy where the model is wrong (Table 3; refusal judged on {max_new_tokens} new tokens), "
                 "and over each whole set")
    else:
        columns = ["set", "label", "n", "Latent Guard % all", "mean Delta_harmful",
                   *(["generative % all"] if generative else [])]
        rows = [[s["set"], s["label"], str(s["n"]), pct(s["latent_guard_accuracy"]),
                 f"{s['mean_delta_harmful']:+.4f}", *([pct(s["generative_guard_accuracy"])] if generative else [])]
                for s in summary]
        title = "guard accuracy over each whole set (no refusal baseline: Table 3's subset is unknown)"
    print_table(title, columns, rows)
    print_table("Latent Guard: each set against every prompt of the other class (AUROC, recall at 1% FPR...)",
                ["set", "accuracy % [95%]", *AGAINST_KEYS],
                [[s["set"], f"{pct(s['latent_guard_accuracy'])} [{s['accuracy_ci_low']:.0f}-{s['accuracy_ci_high']:.0f}]",
                  *[_fig(s[f"{k}_vs_other_class"]) for k in AGAINST_KEYS]] for s in summary]
                + ([["all sets pooled", pct(100 * pooled["accuracy"]), *[_fig(pooled[k]) for k in AGAINST_KEYS]]]
                   if pooled else []))
    emit(results, as_json)


def _fig(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def _decisions(units: dict, g, lazy: Lazy, prompts: list[str]) -> list[float]:
    """The guard's decision per prompt (score - threshold). Units stored before decisions were
    kept hold only Delta_harmful, which is a linear guard's score no more: score them again."""
    lat = units["latent"]
    if "decision" in lat:
        return lat["decision"]
    lazy()
    return [float(x) for x in g.decision_function(prompts)]


TABLE3_NOT_RUN = ["Adv-suffix (GCG suffixes): no such prompt set here",
                  "Persuasion (PAP paraphrases): no such prompt set here"]
"""Table 3 columns this recipe does not produce, listed in every guard-eval result."""



def _latent_unit(g, lazy: Lazy, prompts: list[str]) -> dict:
    lazy()
    rep = g.report(prompts)
    return {"delta_harmful": rep.delta_harmful.tolist(), "harmful": rep.harmful.tolist(),
            "probability": rep.probability.tolist(), "category": rep.category,
            "decision": [float(x) for x in np.asarray(rep.score) - g.threshold_]}


def _baseline_unit(g, lazy: Lazy, ps: PromptSet, max_new_tokens: int, batch_size: int) -> dict:
    from ..analysis import label_replies

    loaded = lazy()
    lab = label_replies(loaded.model, g.chat_formatter(), ps.prompts, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, progress=f"answering {ps.name}")
    return {"replies": lab.replies, "refused": lab.refused}


def _generative(spec: str, mopts: ModelOptions):
    from ..distributed import device_for
    from ..guard import GenerativeGuard
    from ..models import load_model

    device, device_map = (None, "auto") if mopts.device == "auto" else (device_for(mopts.device), None)
    lg = load_model(spec, dtype=mopts.dtype, device=device, device_map=device_map)
    return GenerativeGuard(lg.model, lg.tokenizer, batch_size=mopts.batch_size, progress=True)


def _generative_unit(lazy_gen: Lazy, prompts: list[str]) -> dict:
    verdicts = lazy_gen().classify(prompts)
    return {"label": [v.label for v in verdicts], "categories": [list(v.categories) for v in verdicts],
            "text": [v.text for v in verdicts]}


def _set_summary(ps: PromptSet, label: int, units: dict) -> dict:
    n = len(ps.prompts)
    lat = units["latent"]
    row = {"set": ps.name, "file": ps.path, "label": "harmful" if label else "harmless", "n": n,
           "latent_guard_accuracy": 100.0 * sum(h == bool(label) for h in lat["harmful"]) / n,
           "mean_delta_harmful": sum(lat["delta_harmful"]) / n}
    if "baseline" in units:
        refused = units["baseline"]["refused"]
        row["refusal_baseline_accuracy"] = 100.0 * sum(r == bool(label) for r in refused) / n
        # Table 3's hard cases: harmful prompts the model accepts, harmless ones it refuses;
        # the refusal baseline is wrong on every one of them by construction
        hard = [i for i in range(n) if refused[i] != bool(label)]
        row["n_model_wrong"] = len(hard)
        row["latent_guard_accuracy_where_model_wrong"] = (
            100.0 * sum(lat["harmful"][i] == bool(label) for i in hard) / len(hard) if hard else None)
        row["refusal_baseline_accuracy_where_model_wrong"] = 0.0 if hard else None
    if "generative" in units:
        unsafe = [v == "unsafe" for v in units["generative"]["label"]]
        row["generative_guard_accuracy"] = 100.0 * sum(u == bool(label) for u in unsafe) / n
        if "baseline" in units:
            row["generative_guard_accuracy_where_model_wrong"] = (
                100.0 * sum(unsafe[i] == bool(label) for i in hard) / len(hard) if hard else None)
    return row


def _prediction_rows(ps: PromptSet, label: int, units: dict) -> list[dict]:
    rows = []
    lat = units["latent"]
    for i, p in enumerate(ps.prompts):
        row = {"set": ps.name, "prompt": p, "label": label, "delta_harmful": lat["delta_harmful"][i],
               "latent_harmful": int(lat["harmful"][i])}
        if lat.get("category"):
            row["category"] = lat["category"][i]
        if "baseline" in units:
            row["refused"] = int(units["baseline"]["refused"][i])
            row["reply"] = units["baseline"]["replies"][i]
        if "generative" in units:
            row["generative_verdict"] = units["generative"]["label"][i]
        rows.append(row)
    return rows
