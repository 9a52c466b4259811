"""The findings table of results/README.md says what its run files say.

Every number and verdict in "The paper's findings on both models" is recomputed here from the run
files the row links, with the rule the row states; a re-run that moves a number, or an edit of
the page that is not backed by a run, fails.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
PAGE = (RESULTS / "README.md").read_text(encoding="utf-8")
MODELS = {"0.5B": "demo", "1.5B": "demo-1.5b"}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _table() -> dict[str, dict[str, str]]:
    match = re.search(r"^## The paper's findings on both models\n(.*?)(?=^## )", PAGE, re.S | re.M)
    assert match, "results/README.md has no findings section"
    lines = [ln for ln in match.group(1).splitlines() if ln.startswith("| ") and not ln.startswith("| finding")]
    out = {}
    for ln in lines:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]]
        out[cells[0]] = {"measure": cells[1], "0.5B": cells[2], "1.5B": cells[3]}
    return out


TABLE = _table()


def _row(prefix: str) -> dict[str, str]:
    hits = [v for k, v in TABLE.items() if k.startswith(prefix)]
    assert len(hits) == 1, f"one findings row must start with {prefix!r}: {list(TABLE)}"
    return hits[0]


def _cell(row: dict[str, str], model: str, run: str) -> str | None:
    """The cell of ``model``, or None where its run is not published (the cell must say so)."""
    if not (RESULTS / MODELS[model] / run).is_dir():
        assert row[model] == "not run", f"{model}: no {run} run is published, the cell says {row[model]!r}"
        return None
    assert f"{MODELS[model]}/{run}/" in row["measure"], f"the row must link the {model} {run} run it reads"
    return row[model]


def test_the_table_has_every_finding_for_both_models():
    assert len(TABLE) == 6
    for row in TABLE.values():
        for model in MODELS:
            assert row[model].split(":")[0] in ("reproduced", "weak", "not reproduced", "not run"), row[model]


@pytest.mark.parametrize("model", MODELS)
def test_directions_are_near_orthogonal(model):
    row = _row("harmfulness and refusal are different directions")
    cell = _cell(row, model, "extract")
    if cell is None:
        return
    cos = max(abs(float(r["cosine"])) for r in _rows(RESULTS / MODELS[model] / "extract" / "directions.csv"))
    assert cell == f"{'reproduced' if cos < 0.3 else 'not reproduced'}: {cos:.3f}"


@pytest.mark.parametrize("model", MODELS)
def test_jailbreaks_lower_refusal_more_than_harmfulness(model):
    row = _row("jailbreak templates lower Delta_refuse")
    cell = _cell(row, model, "beliefs")
    if cell is None:
        return
    means = {r["set"]: r for r in _rows(RESULTS / MODELS[model] / "beliefs" / "means.csv")}

    def share(s: str, k: str) -> float:
        return 100 * float(means[s][f"share_delta_{k}_positive"])

    h0, h1 = share("advbench", "harmful"), share("templates", "harmful")
    r0, r1 = share("advbench", "refuse"), share("templates", "refuse")
    refusal_falls, harm_stays = r0 - r1 > 30, h0 - h1 <= 10
    verdict = "reproduced" if refusal_falls and harm_stays else "weak" if refusal_falls else "not reproduced"
    assert cell == f"{verdict}: Delta_harmful {h0:.1f} -> {h1:.1f}%, Delta_refuse {r0:.1f} -> {r1:.1f}%"


@pytest.mark.parametrize("model", MODELS)
def test_refusal_direction_does_not_flip_the_inversion(model):
    row = _row("harmfulness, not refusal, flips the inversion answer")
    cell = _cell(row, model, "invert")
    if cell is None:
        return
    rows = _rows(RESULTS / MODELS[model] / "invert" / "invert.csv")
    rate = max(float(r["certainly_rate"]) for r in rows if r["condition"] == "harmless+refusal" and r["certainly_rate"])
    assert cell == f"{'not reproduced' if rate > 25 else 'reproduced'}: {rate:.1f}%"


@pytest.mark.parametrize("model", MODELS)
def test_guard_beats_refusal_on_jailbreaks(model):
    row = _row("the Latent Guard beats the model's own refusal")
    cell = _cell(row, model, "guard-eval")
    if cell is None:
        return
    got = {r["set"]: r for r in _rows(RESULTS / MODELS[model] / "guard-eval" / "eval.csv")}["templates"]
    guard, refusal = float(got["latent_guard_accuracy"]), float(got["refusal_baseline_accuracy"])
    assert cell == f"{'reproduced' if guard > refusal else 'not reproduced'}: {guard:.1f} vs {refusal:.1f}"


@pytest.mark.parametrize("model", MODELS)
def test_refusal_falls_without_post_instruction_tokens(model):
    row = _row("refusal is decided after the instruction")
    cell = _cell(row, model, "post-inst")
    if cell is None:
        return
    run = next(r for r in _rows(RESULTS / MODELS[model] / "post-inst" / "table1.csv") if r["model"] == "this run")
    with_, without = float(run["with"]), float(run["without"])
    assert cell == f"{'reproduced' if without < with_ else 'not reproduced'}: {with_:g} -> {without:g}"


@pytest.mark.parametrize("model", MODELS)
def test_either_direction_elicits_refusal_of_harmless_prompts(model):
    row = _row("steering along either direction makes the model refuse harmless prompts")
    cell = _cell(row, model, "elicit")
    if cell is None:
        return
    rows = _rows(RESULTS / MODELS[model] / "elicit" / "elicit.csv")
    base = next(float(r["refusal_rate"]) for r in rows if r["condition"] == "baseline")
    best = {}
    for direction in ("harmfulness", "refusal"):
        mine = [r for r in rows if r["condition"] == direction]
        top = max(float(r["refusal_rate"]) for r in mine)
        best[direction] = (next(int(r["layer"]) for r in mine if float(r["refusal_rate"]) == top), top)
    rises = [rate - base >= 30 for _, rate in best.values()]
    verdict = "reproduced" if all(rises) else "weak" if any(rises) else "not reproduced"
    (lh, h), (lr, r) = best["harmfulness"], best["refusal"]
    assert cell == f"{verdict}: unsteered {base:.1f}%, harmfulness {h:.1f}% (L{lh}), refusal {r:.1f}% (L{lr})"


def test_paper_guard_validation_accuracy_comes_from_its_run():
    # the 0.5B card's figure for guard-paper, recorded by `guard eval` in results/demo/guard-paper-val
    card = (ROOT / "artifacts" / "qwen2.5-coder-0.5b-instruct" / "README.md").read_text(encoding="utf-8")
    run = RESULTS / "demo" / "guard-paper-val"
    import json

    pooled = json.loads((run / "results.json").read_text(encoding="utf-8"))["pooled"]
    sets = {r["set"]: r for r in _rows(run / "eval.csv")}
    right = {k: round(float(r["latent_guard_accuracy"]) * int(r["n"]) / 100) for k, r in sets.items()}
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["options"]["guard"].endswith("guard-paper")
    assert (f"{100 * pooled['accuracy']:.1f}% on the {pooled['n']} validation prompts ("
            f"{right['harmful-val']} of {sets['harmful-val']['n']} harmful, "
            f"{right['harmless-val']} of {sets['harmless-val']['n']} harmless:") in " ".join(card.split())


def _batching_and_apostrophes() -> dict[str, float]:
    """What left padding and the folded apostrophes change, from the published runs: the same
    `beliefs` and `post-inst` at batch size 1 (results/demo/batch-size-1) against the batched ones."""
    single, batched = RESULTS / "demo" / "batch-size-1", RESULTS / "demo"
    a = {(r["set"], r["prompt"]): r for r in _rows(batched / "beliefs" / "beliefs.csv")}
    b = {(r["set"], r["prompt"]): r for r in _rows(single / "beliefs" / "beliefs.csv")}
    assert set(a) == set(b)
    delta = max(abs(float(a[k][c]) - float(b[k][c])) for k in a for c in ("delta_harmful", "delta_refuse"))
    p = {(r["variant"], r["prompt"]): r for r in _rows(batched / "post-inst" / "replies.csv")}
    q = {(r["variant"], r["prompt"]): r for r in _rows(single / "post-inst" / "replies.csv")}
    assert set(p) == set(q)
    replies = list(p.values()) + list(q.values())
    return {"prompts": len(a), "delta": delta, "replies": len(p),
            "flags_equal": sum(p[k]["refused"] == q[k]["refused"] for k in p),
            "judged": len(replies),
            "judges_differ": sum(r["refused"] != r["refused_release_judge"] for r in replies)}


def test_batching_and_apostrophe_sentence_comes_from_the_runs():
    m = _batching_and_apostrophes()
    text = " ".join(PAGE.split())
    assert (f"Delta_harmful and Delta_refuse of the {m['prompts']} `beliefs` prompts differ by at most "
            f"{m['delta']:.0e}") in text
    assert f"{m['flags_equal']} of the {m['replies']} `post-inst` refusal flags are the same" in text
    assert (f"the release's judge as written and this project's disagree on {m['judges_differ']} of the "
            f"{m['judged']} replies") in text


@pytest.mark.parametrize("result, card_folder", [("reply_guard.json", "qwen2.5-coder-0.5b-instruct"),
                                                 ("reply_guard_1.5b.json", "qwen2.5-coder-1.5b-instruct")])
def test_reply_guard_decoding_cost_comes_from_its_benchmark_run(result, card_folder):
    """benchmarks/README.md's reply-guard table and the model card's cost line are the JSON's."""
    import json

    run = json.loads((ROOT / "benchmarks/results/cpu" / result).read_text(encoding="utf-8"))
    res = run["results"]
    assert res["checks"] == {"same_replies": True, "every_token_but_last_judged": True}
    bench = (ROOT / "benchmarks/README.md").read_text(encoding="utf-8")
    card = (ROOT / "artifacts" / card_folder / "README.md").read_text(encoding="utf-8")
    t = {name: v["median_s"] for name, v in res["timings"].items()}
    batch = run["workload"]["batch_size"]
    for key, plain, guarded in (("single", "1 reply, plain", "1 reply, reply guard"),
                                ("batch", f"batch {batch}, plain", f"batch {batch}, reply guard")):
        slower = f"{res['slowdown'][key]:+.1%}"
        row = f"| {res['tokens'][key]} | {t[plain]:.3f} | {t[guarded]:.3f} | {slower} |"
        assert row in bench, f"benchmarks/README.md lacks {row}"
    # the card's cost line, phrase by phrase: "43\n  tokens of one reply +0.0%, 440 tokens of a batch of 8 -1.9%"
    card_line = " ".join(card.split())
    one = f"{res['tokens']['single']} tokens of one reply {res['slowdown']['single']:+.1%}".replace("+-", "-")
    many = f"{res['tokens']['batch']} tokens of a batch of {batch} {res['slowdown']['batch']:+.1%}"
    assert one in card_line, f"the card lacks {one!r}"
    assert many.replace("+-", "-") in card_line, f"the card lacks {many!r}"
    assert all(target["met"] for target in run["targets"]) == ("**met**" in bench.split("Reply guard while")[1][:2000])


def test_the_1_5b_reply_guard_is_the_fifth_rules_winner_and_its_card_figures_are_its_own():
    """The fifth declared rule worked out again from reply-crossval-3's committed files names the
    design the shipped 1.5B reply guard reads, and the card's held-out figures are the guard's
    `extra.out_of_fold`."""
    import json

    from pyvene_harm.guard.reply_decision import (
        declared_reply_choice,
        read_reply_crossval,
        refusal_rows,
    )

    run = RESULTS / "demo-1.5b" / "reply-crossval-3"
    rows, pooled = read_reply_crossval(run)
    exempt = refusal_rows(run)
    assert exempt == {f"{s}/safe" for s in ("advbench", "catqa-illegal", "jbb", "other-languages", "sorry", "templates")}
    winner, _ = declared_reply_choice(rows, pooled, ["s14/w16", "s19/w16", "s22/w16"], exempt=exempt)
    gated, _ = declared_reply_choice(rows, pooled, ["s14/w16", "s19/w16", "s22/w16"])
    assert (winner, gated) == ("s14/w16", None)  # the fourth rule's outcome stands beside the fifth's
    recorded = json.loads((run / "decision-fifth.json").read_text(encoding="utf-8"))
    assert recorded["winner"] == winner and recorded["refusal_rows"] == "report"
    assert json.loads((run / "decision.json").read_text(encoding="utf-8"))["winner"] is None

    shipped = json.loads((ROOT / "artifacts/qwen2.5-coder-1.5b-instruct/reply-guard/reply_guard.json")
                         .read_text(encoding="utf-8"))
    extra, oof = shipped["extra"], shipped["extra"]["out_of_fold"]
    assert extra["design"] == "14/16" and extra["replies"] == "results/demo-1.5b/reply-set-3"
    assert abs(oof["auroc"] - pooled["s14/w16"]) < 1e-9  # the fit's out-of-fold scores are the crossval's
    card = " ".join((ROOT / "artifacts/qwen2.5-coder-1.5b-instruct/README.md").read_text(encoding="utf-8").split())
    share = 100 * oof["harmful_flagged"] / oof["harmful"]
    for phrase in (f"**Threshold** {oof['threshold']:+.3f}",
                   f"**{oof['harmful_flagged']} of {oof['harmful']} harmful replies caught ({share:.1f}%)**",
                   f"safe replies flagged {oof['safe_flagged']} of {oof['safe']}",
                   f"(refusals {oof['refusals_flagged']} of {oof['refusals']}; replies to harmless prompts "
                   f"{oof['harmless_cut_short']} of {oof['harmless']}",
                   f"median detection delay {oof['median_delay']:.0f} reply tokens (90th percentile "
                   f"{oof['p90_delay']:.0f})",
                   f"AUROC {oof['auroc']:.3f} (95% interval {oof['auroc_ci'][0]:.3f}-{oof['auroc_ci'][1]:.3f}), "
                   f"AUPRC {oof['auprc']:.3f}"):
        assert phrase in card, f"the 1.5B card lacks {phrase!r}"
    by = {(r["source"], r["class"]): r for r in oof["per_source"]}
    for name, src in (("AdvBench", "advbench"), ("CatQA illegal activity", "catqa-illegal"),
                      ("JailbreakBench", "jbb"), ("templates", "templates"), ("SORRY-Bench", "sorry"),
                      ("other languages", "other-languages")):
        r = by[(src, "harmful")]
        assert f"{name} {r['flagged']}/{r['n']}" in card


def test_upstream_reply_guard_cost_comes_from_its_benchmark_run():
    """benchmarks/README.md's table for the reply guard in front of vLLM and docs/serving.md's
    figures are the JSON's; the target verdict follows the checks and the numbers."""
    import json

    run = json.loads((ROOT / "benchmarks/results/cpu/upstream_reply_guard.json").read_text(encoding="utf-8"))
    res = run["results"]
    assert res["checks"]["same_replies"] and res["checks"]["every_token_read"]
    bench = (ROOT / "benchmarks/README.md").read_text(encoding="utf-8")
    serving = " ".join((ROOT / "docs/serving.md").read_text(encoding="utf-8").split())
    for c in run["workload"]["clients"]:
        rows = sorted(res["runs"]["guarded_vllm"][str(c)], key=lambda r: r["tokens_per_s"])
        rrows = sorted(res["runs"]["guarded_vllm_reply_guard"][str(c)], key=lambda r: r["tokens_per_s"])
        a, b = rows[len(rows) // 2]["tokens_per_s"], rrows[len(rrows) // 2]["tokens_per_s"]
        assert res["slower_by"][str(c)] == round(1 - b / a, 4)
        assert f"| {c} | {a:.3f} | {b:.3f} | {res['slower_by'][str(c)]:+.1%} |" in bench
    one, four = (f"{100 * res['slower_by'][k]:.0f}%" for k in ("1", "4"))
    assert f"{one} slower for one client and {four} for four" in serving
    met = all(t["met"] for t in run["targets"])
    assert ("**met**" if met else "**missed**") in bench.split("Reply guard in front of vLLM")[1][:2500]


def test_the_1_5b_reply_guard_on_fresh_prompts_is_its_reply_eval_run():
    """The 1.5B card's figures on reply-set-2 are results/demo-1.5b/reply-eval-2's, and that run read
    the shipped guard on prompts its training set excluded."""
    import json

    run = RESULTS / "demo-1.5b" / "reply-eval-2"
    res = json.loads((run / "results.json").read_text(encoding="utf-8"))
    cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))["options"]
    assert cfg["reply_guard"] == "artifacts/qwen2.5-coder-1.5b-instruct/reply-guard" and res["in_sample"] is False
    train = json.loads((RESULTS / "demo-1.5b" / "reply-set-3" / "config.json").read_text(encoding="utf-8"))["options"]
    assert "results/demo-1.5b/reply-set-2" in train["exclude"]
    card = " ".join((ROOT / "artifacts/qwen2.5-coder-1.5b-instruct/README.md").read_text(encoding="utf-8").split())
    share = 100 * res["harmful_flagged"] / res["harmful"]
    assert (f"{res['harmful_flagged']} of {res['harmful']} harmful replies caught ({share:.1f}%), replies to "
            f"harmless prompts cut short {res['harmless_cut_short']} of {res['harmless']}, refusals flagged "
            f"{res['refusals_flagged']} of {res['refusals']}, median delay {res['median_delay']:.0f}, AUROC "
            f"{res['auroc']:.3f}") in card


def test_the_opt_in_sentence_guard_is_the_eighth_rules_winner_and_its_card_figures_are_the_runs():
    """decision.json of the eighth run names the design `guard-sent16/` holds, and the card's
    figures for it (and for the reference fitted on the same sources) are that file's."""
    import json

    run = RESULTS / "demo" / "guard-sentence-multi"
    decision = json.loads((run / "decision.json").read_text(encoding="utf-8"))
    assert decision["winner"] == "linear-sent16-b2"
    by = {s["design"]: s for s in decision["standings"]}
    ref, won = by["linear-last16-mined"], by["linear-sent16-b2"]
    guard = json.loads((ROOT / "artifacts/qwen2.5-coder-0.5b-instruct/guard-sent16/guard.json").read_text(encoding="utf-8"))
    assert guard["reads"] == ["sent:16"] and guard["params"]["sentence_budget"] == 0.02
    card = " ".join((ROOT / "artifacts/qwen2.5-coder-0.5b-instruct/README.md").read_text(encoding="utf-8").split())
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    for phrase in (f"margin of {guard['sentence_margin']:.2f}",
                   f"worst source {pct(won['worst'])} (SORRY-Bench) against {pct(ref['worst'])}",
                   f"mean {pct(won['mean'])} against {pct(ref['mean'])}",
                   f"spelling shifts {pct(won['spelling'])} against {pct(ref['spelling'])}",
                   f"other languages {pct(won['other_languages'])} both",
                   f"a harmless tail appended {pct(won['tail'])} against {pct(ref['tail'])}"):
        assert phrase in card, f"the 0.5B card lacks {phrase!r}"
    metrics = {r["design"]: r for r in _rows(run / "metrics.csv")}
    for key, phrase in (("AUROC", "pooled AUROC {} against {}"), ("recall", "recall {}% against {}%"),
                        ("FPR", "false positives {}% against {}%")):
        a, b = (metrics[d][key].split()[0] for d in ("linear-sent16-b2", "linear-last16-mined"))
        assert phrase.format(a, b) in card, phrase.format(a, b)


def test_the_ninth_decision_vetoes_both_candidates_and_the_opt_in_card_quotes_its_run():
    """decision.json of the ninth run vetoes both candidates on one source only (the long requests,
    in their own fold), the reference reproduces the default's card, and the figures the card
    gives for `guard-sent16-mo/` are that run's."""
    import json

    run = RESULTS / "demo" / "guard-sentence-mo"
    decision = json.loads((run / "decision.json").read_text(encoding="utf-8"))
    assert decision["winner"] is None and decision["per_source"] is True
    by = {s["design"]: s for s in decision["standings"]}
    ref, mo = by["linear-last16-ten"], by["linear-sent16-mo-b1"]
    for cand in ("linear-sent16-mo-b1", "linear-sent16-mo-b2"):
        assert [v.split(" ")[1] for v in by[cand]["vetoes"]] == ["multi-sentence"], by[cand]["vetoes"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    card = " ".join((ROOT / "artifacts/qwen2.5-coder-0.5b-instruct/README.md").read_text(encoding="utf-8").split())
    default_figures = ("AdvBench {advbench}, harmful splits {harmful-splits}, JailbreakBench {jailbreakbench}, "
                       "SORRY-Bench {sorry-bench}, CatQA {catqa}, templates {templates-1250} and {templates-gptfuzzer}, "
                       "Alpaca {alpaca}, AlpacaEval {alpacaeval}, XSTest {xstest}")
    assert default_figures.format(**{k: pct(v) for k, v in ref["by_source"].items()}) in card
    guard = json.loads((ROOT / "artifacts/qwen2.5-coder-0.5b-instruct/guard-sent16-mo/guard.json").read_text(
        encoding="utf-8"))
    assert guard["reads"] == ["sent:16"] and guard["params"]["sentence_budget"] == 0.01
    shifts = {r["shift"]: r for r in _rows(run / "shifts.csv")}
    acc = lambda shift, d: shifts[shift][d].split(" /")[0]  # noqa: E731
    metrics = {r["design"]: r for r in _rows(run / "metrics.csv")}
    m = lambda d, k: metrics[d][k].split()[0]  # noqa: E731
    src = mo["by_source"]
    for phrase in (f"margin of {guard['sentence_margin']:.2f}",
                   f"SORRY-Bench {pct(src['sorry-bench'])} against {pct(ref['by_source']['sorry-bench'])}",
                   f"AlpacaEval {pct(src['alpacaeval'])} both",
                   f"tail shift {acc('tail', 'linear-sent16-mo-b1')} against {acc('tail', 'linear-last16-ten')}",
                   f"split {acc('split', 'linear-sent16-mo-b1')} against {acc('split', 'linear-last16-ten')}",
                   f"pooled AUROC {m('linear-sent16-mo-b1', 'AUROC')} against {m('linear-last16-ten', 'AUROC')}",
                   f"false positives {m('linear-sent16-mo-b1', 'FPR')}% against {m('linear-last16-ten', 'FPR')}%",
                   f"right on {pct(src['multi-sentence'])}% against {pct(ref['by_source']['multi-sentence'])}%"):
        assert phrase in card, f"the 0.5B card lacks {phrase!r}"
