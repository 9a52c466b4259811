"""scripts/garak_families.py without garak: its report reading and its table (garak itself runs
only where it is installed; see results/demo/garak)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "garak_families.py"


def _load():
    spec = importlib.util.spec_from_file_location("garak_families", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _attempt(text):
    return {"entry_type": "attempt", "status": 2, "outputs": [{"text": text} if text is not None else None]}


def test_report_pass_rates_count_only_answered_attempts_and_join_the_guard_table(tmp_path):
    g = _load()
    report = tmp_path / "scan.report.jsonl"
    lines = [{"entry_type": "start_run setup"}, _attempt("I'm sorry"), _attempt("Sure, step 1"), _attempt(None),
             {"entry_type": "attempt", "status": 1, "outputs": []},
             {"entry_type": "eval", "probe": "probes.dan.DanInTheWild", "detector": "detector.mitigation.MitigationBypass",
              "passed": 1, "fails": 1, "nones": 0, "total_evaluated": 2, "total_processed": 2},
             {"entry_type": "eval", "probe": "probes.tap.TAPCached", "detector": "detector.mitigation.MitigationBypass",
              "passed": 0, "fails": 0, "nones": 0, "total_evaluated": 0, "total_processed": 0}]
    report.write_text("".join(json.dumps(x) + "\n" for x in lines))
    probes, attempts = g.read_report(report)
    assert attempts == 2  # an error's empty output and an unfinished attempt are not replies
    assert probes["dan.DanInTheWild"] == {"detector": "mitigation.MitigationBypass", "passed": 1, "evaluated": 2,
                                          "pass_rate": 0.5}
    assert probes["tap.TAPCached"]["pass_rate"] is None
    (tmp_path / "results.json").write_text(json.dumps({"families": {
        "dan": {"probe": "dan.DanInTheWild", "sent": 60, "flagged": 36, "flagged_share": 0.6},
        "tap": {"probe": "tap.TAPCached", "sent": 9, "flagged": 4, "flagged_share": 0.4444}}}))
    g._write_table(tmp_path)
    assert (tmp_path / "table.md").read_text().splitlines()[2] == "| dan | `dan.DanInTheWild` | 36 / 60 | 60.0% |"
    (tmp_path / "scan.json").write_text(json.dumps({"probes": probes}))
    g._write_table(tmp_path)
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[2].endswith("| 50.0% (1 / 2, `mitigation.MitigationBypass`) |")
    assert table[3].endswith("| - |")


def test_families_name_the_harmless_prompts_flagged():
    """The harmless rows keep which prompts were flagged (the traffic file holds three harmful
    requests on purpose); attack payloads keep only counts."""
    g = _load()
    rows = [{"family": "dan", "probe": "dan.DanInTheWild", "prompt": "p1"},
            {"family": "dan", "probe": "dan.DanInTheWild", "prompt": "p2"},
            {"family": "everyday traffic", "probe": "pyvene_harm/prompts/example_traffic.jsonl", "prompt": "meth"},
            {"family": "everyday traffic", "probe": "pyvene_harm/prompts/example_traffic.jsonl", "prompt": "budget"}]
    fams = g._families(rows, [True, False, True, False])
    assert fams["dan"] == {"probe": "dan.DanInTheWild", "sent": 2, "flagged": 1, "harmful_family": True,
                           "flagged_share": 0.5}
    assert fams["everyday traffic"]["flagged_prompts"] == ["meth"] and not fams["everyday traffic"]["harmful_family"]
    assert {r["family"] for r in g._harmless_rows()} == {name for name, _ in g.HARMLESS}

