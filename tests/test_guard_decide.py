"""The declared rule of docs/guard-choice.md worked out from a crossval run's results.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyvene_harm.cli import main
from pyvene_harm.guard.decision_rule import declared_choice, standing

ROOT = Path(__file__).resolve().parents[1]


def _results(designs: dict[str, dict]) -> dict:
    """A results.json with two sources, one shift source and the shifts the rule reads."""
    rows, shifts = [], []
    for name, d in designs.items():
        rows += [{"design": name, "source": "harm", "accuracy": d["harm"], "shift_source": False},
                 {"design": name, "source": "safe", "accuracy": d["safe"], "shift_source": False},
                 {"design": name, "source": "langs", "accuracy": d["langs"], "shift_source": True}]
        shifts += [{"design": name, "shift": k, "n": n, "accuracy": d[k]}
                   for k, n in (("typos", 10), ("leet", 30), ("spacing", 10), ("homoglyph", 10), ("tail", 20))]
    return {"rows": rows, "shifts": shifts}


BASE = dict(harm=0.9, safe=0.7, langs=0.8, typos=0.8, leet=0.2, spacing=0.8, homoglyph=0.2, tail=0.5)


def test_standing_pools_the_spelling_shifts_by_count():
    s = standing(_results({"ref": BASE}), "ref")
    assert (s.worst, s.worst_source) == (0.7, "safe") and s.mean == pytest.approx(0.8)
    assert s.spelling == pytest.approx((0.8 * 10 + 0.2 * 30 + 0.8 * 10 + 0.2 * 10) / 60)
    assert s.other_languages == 0.8 and s.tail == 0.5


def test_each_veto_and_the_tie_break():
    designs = {"ref": BASE,
               "good": {**BASE, "safe": 0.69, "tail": 0.8},
               "better-mean": {**BASE, "safe": 0.69, "harm": 0.95, "tail": 0.8},
               "worst-falls": {**BASE, "safe": 0.60, "tail": 0.9},
               "spelling-falls": {**BASE, "leet": 0.0, "tail": 0.9},
               "langs-fall": {**BASE, "langs": 0.7, "tail": 0.9},
               "tail-level": {**BASE, "harm": 1.0}}
    winner, st = declared_choice(_results(designs), "ref", list(designs)[1:])
    by = {s.design: s for s in st}
    assert winner == "better-mean"  # ties on the worst source go to the higher mean
    assert not by["good"].vetoes and by["worst-falls"].vetoes[0].startswith("worst source 60.0% (safe)")
    assert by["spelling-falls"].vetoes[0].startswith("spelling shifts")
    assert by["langs-fall"].vetoes[0].startswith("other languages")
    assert by["tail-level"].vetoes[0].startswith("tail shift 50.0% not above 50.0%")
    assert declared_choice(_results(designs), "ref", ["tail-level"], tail_must_rise=False)[0] == "tail-level"
    with pytest.raises(ValueError, match="not in this run"):
        standing(_results(designs), "nope")


def test_the_per_source_veto_holds_every_source_and_shift_source():
    designs = {"ref": {**BASE, "harm": 0.95},
               "harm-falls": {**BASE, "harm": 0.92, "tail": 0.8},  # worst source still safe: 70.0
               "langs-fall": {**BASE, "harm": 0.95, "langs": 0.77, "tail": 0.8},
               "level": {**BASE, "harm": 0.94, "safe": 0.69, "langs": 0.79, "tail": 0.8}}
    assert declared_choice(_results(designs), "ref", ["harm-falls", "langs-fall"])[0] == "harm-falls"
    winner, st = declared_choice(_results(designs), "ref", list(designs)[1:], per_source=True)
    by = {s.design: s for s in st}
    assert winner == "level" and by["level"].by_source == {"harm": 0.94, "safe": 0.69, "langs": 0.79}
    assert by["harm-falls"].vetoes == ["source harm 92.0% against 95.0%"]
    assert by["langs-fall"].vetoes[-1] == "source langs 77.0% against 80.0%"  # (its mean too, alone here)


@pytest.mark.parametrize("run, candidates", [
    ("guard-scan", ["linear-scan16-mined", "linear-scan8-mined", "linear-scan4-mined"]),
    ("guard-scan-neg", ["scan16-neg8", "scan16-neg16", "scan32-neg16"]),
])
def test_published_decisions_follow_from_their_runs(run, candidates):
    # docs/guard-choice.md: reference 68.7 on SORRY-Bench, tail 59.5; every candidate vetoed on AlpacaEval
    results = json.loads((ROOT / "results" / "demo" / run / "results.json").read_text())
    winner, st = declared_choice(results, "linear-last16-mined", candidates)
    assert winner is None
    assert (round(100 * st[0].worst, 1), st[0].worst_source, round(100 * st[0].tail, 1)) == (68.7, "sorry-bench", 59.5)
    assert all(s.worst_source == "alpacaeval" and s.vetoes[0].startswith("worst source") for s in st[1:])


def test_decide_writes_the_decision_beside_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    for f in ("config.json", "results.json"):
        shutil.copy(ROOT / "results" / "demo" / "guard-scan-neg" / f, run / f)
    res = CliRunner().invoke(main, ["guard", "decide", str(run), "--reference", "linear-last16-mined",
                                    "--candidate", "scan16-neg8", "--json"])
    assert res.exit_code == 0, res.output
    written = json.loads((run / "decision.json").read_text())
    assert written["winner"] is None and written["standings"][1]["worst_source"] == "alpacaeval"
    bad = CliRunner().invoke(main, ["guard", "decide", str(run), "--reference", "linear-last16-mined",
                                    "--candidate", "nope"])
    assert bad.exit_code == 2 and "not in this run" in bad.output
    empty = CliRunner().invoke(main, ["guard", "decide", str(tmp_path), "--reference", "a", "--candidate", "b"])
    assert empty.exit_code == 2 and "finished `guard crossval` run" in empty.output
    (run / "config.json").write_text(json.dumps({"command": "beliefs"}))
    other = CliRunner().invoke(main, ["guard", "decide", str(run), "--reference", "a", "--candidate", "b"])
    assert other.exit_code == 2 and "not a guard crossval" in other.output


# the reply guard's rule (docs/reply-guard-choice.md, third and fourth runs)

def _reply_run(tmp_path: Path, aurocs: dict[str, dict[str, float]], pooled: dict[str, float],
               command: str = "guard-reply-crossval") -> Path:
    """A reply-crossval folder: crossval.csv rows per (source, class), pooled AUROCs in results.json."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    lines = ["design,source,class,auroc,n"]
    for design, rows in aurocs.items():
        lines += [f"{design},{key.split('/')[0]},{key.split('/')[1]},{v},10" for key, v in rows.items()]
    (run / "crossval.csv").write_text("\n".join(lines) + "\n")
    (run / "results.json").write_text(json.dumps({"pooled": {d: {"auroc": v} for d, v in pooled.items()}}))
    (run / "config.json").write_text(json.dumps({"command": command}))
    return run


# "a" has the best worst row but falls 0.03 behind ngram on b/safe; "b" is level within the
# tolerance; "c" passes the rows but not the pooled AUROC
REPLY_ROWS = {"a": {"x/harmful": 0.95, "b/safe": 0.97}, "b": {"x/harmful": 0.90, "b/safe": 0.985},
              "c": {"x/harmful": 0.92, "b/safe": 1.0}, "ngram": {"x/harmful": 0.80, "b/safe": 1.0}}
REPLY_POOLED = {"a": 0.96, "b": 0.95, "c": 0.85, "ngram": 0.85}


def test_reply_rule_checks_before_it_chooses_or_after():
    from pyvene_harm.guard.reply_decision import declared_reply_choice

    winner, standings = declared_reply_choice(REPLY_ROWS, REPLY_POOLED, ["a", "b", "c"])
    assert winner == "b" and [s.design for s in standings] == ["a", "c", "b"]
    a, c, b = standings
    assert a.behind == ["b/safe: 0.970 vs 1.000"] and not a.passes and (a.worst, a.worst_row) == (0.95, "x/harmful")
    assert c.pooled_not_above and not c.behind and not c.passes and b.passes
    assert declared_reply_choice(REPLY_ROWS, REPLY_POOLED, ["a", "b", "c"], order="choose-first")[0] is None
    assert declared_reply_choice(REPLY_ROWS, REPLY_POOLED, ["a", "b"], tolerance=0.03)[0] == "a"  # 0.03 forgiven
    assert declared_reply_choice(REPLY_ROWS, REPLY_POOLED, ["c"])[0] is None
    with pytest.raises(ValueError, match="'zz' not in this run|zz not in this run"):
        declared_reply_choice(REPLY_ROWS, REPLY_POOLED, ["zz"])


def test_reply_decide_writes_decision_json_and_refuses_other_runs(tmp_path):
    run = _reply_run(tmp_path, REPLY_ROWS, REPLY_POOLED)
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(run), "--candidate", "a", "--candidate", "b", "--json"])
    assert r.exit_code == 0, r.output
    decision = json.loads((run / "decision.json").read_text())
    assert decision["winner"] == "b" and decision["order"] == "check-first" and decision["control_pooled"] == 0.85
    assert [s["passes"] for s in decision["standings"]] == [False, True]
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(run), "--candidate", "a", "--order", "choose-first"])
    assert r.exit_code == 0 and "no candidate may ship" in r.output
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(run), "--candidate", "nope"])
    assert r.exit_code == 2 and "nope" in r.output
    other = _reply_run(tmp_path / "o", REPLY_ROWS, REPLY_POOLED, command="guard-crossval")
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(other), "--candidate", "a"])
    assert r.exit_code == 2 and "not a guard reply-crossval" in r.output
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(tmp_path / "missing"), "--candidate", "a"])
    assert r.exit_code == 2 and "cannot read" in r.output


def test_refusal_rows_report_without_gating(tmp_path):
    """The fifth rule: a row of refusals (every safe reply of a harmful-prompt source refused) is
    reported but cannot fail a candidate; a row of harmless replies still can."""
    from pyvene_harm.guard.reply_decision import declared_reply_choice, refusal_rows

    run = _reply_run(tmp_path, REPLY_ROWS, REPLY_POOLED)
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "replies.csv").write_text(
        "source,kind,label\nb,refusal,0\nb,ablated,1\nb,refusal,0\nh,harmless,0\nx,accepted,1\n")
    (run / "config.json").write_text(json.dumps({"command": "guard-reply-crossval",
                                                 "options": {"replies": str(tmp_path / "set")}}))
    assert refusal_rows(run) == {"b/safe"}
    winner, standings = declared_reply_choice(REPLY_ROWS, REPLY_POOLED, ["a", "b", "c"], exempt={"b/safe"})
    a = standings[0]
    assert winner == "a" and a.passes and a.behind == [] and a.behind_not_gating == ["b/safe: 0.970 vs 1.000"]
    assert a.as_dict()["behind_not_gating"] == ["b/safe: 0.970 vs 1.000"]
    # a row mixing a refusal with a harmless reply is not a row of refusals
    (tmp_path / "set" / "replies.csv").write_text("source,kind,label\nb,refusal,0\nb,harmless,0\n")
    assert refusal_rows(run) == set()
    with pytest.raises(ValueError, match="not rows of this run"):
        declared_reply_choice(REPLY_ROWS, REPLY_POOLED, ["a"], exempt={"zz/safe"})
    # a relative reply-set path is found under a folder above the run
    (run / "config.json").write_text(json.dumps({"command": "guard-reply-crossval", "options": {"replies": "set"}}))
    (tmp_path / "set" / "replies.csv").write_text("source,kind,label\nb,refusal,0\n")
    assert refusal_rows(run) == {"b/safe"}

    r = CliRunner().invoke(main, ["guard", "reply-decide", str(run), "--candidate", "a", "--candidate", "b",
                                  "--refusal-rows", "report"])
    assert r.exit_code == 0, r.output
    decision = json.loads((run / "decision.json").read_text())
    assert decision["winner"] == "a" and decision["refusal_rows"] == "report"
    assert decision["rows_not_gating"] == ["b/safe"]
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(run), "--candidate", "a", "--candidate", "b"])
    assert json.loads((run / "decision.json").read_text())["winner"] == "b"  # gating, as before
    (run / "config.json").write_text(json.dumps({"command": "guard-reply-crossval",
                                                 "options": {"replies": "nowhere"}}))
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(run), "--candidate", "a", "--refusal-rows", "report"])
    assert r.exit_code == 2 and "no replies.csv" in r.output
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(run), "--candidate", "a", "--output", "d5.json"])
    assert r.exit_code == 0 and (run / "d5.json").is_file()
    r = CliRunner().invoke(main, ["guard", "reply-decide", str(run), "--candidate", "a", "--output", "../d.json"])
    assert r.exit_code == 2 and "not a .json file name" in r.output


def test_reply_decide_reproduces_the_third_runs_published_outcome():
    """The third run's rule (choose first) worked out from its committed files: nothing ships."""
    from pyvene_harm.guard.reply_decision import declared_reply_choice, read_reply_crossval

    rows, pooled = read_reply_crossval(ROOT / "results/demo-1.5b/reply-crossval-2")
    designs = ["s14/w16", "s19/w16", "s22/w16"]
    winner, standings = declared_reply_choice(rows, pooled, designs, order="choose-first")
    assert winner is None and standings[0].design == "s22/w16" and standings[0].behind == ["jbb/safe: 0.970 vs 1.000"]
    recorded = json.loads((ROOT / "results/demo-1.5b/reply-crossval-2/decision.json").read_text())
    assert recorded["winner"] is None and recorded["order"] == "choose-first"
