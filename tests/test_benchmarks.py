"""The benchmark scripts run (``--quick``: tiny random model) and write complete JSON.

No speed is asserted: timings on a shared CI machine mean nothing. What is asserted is that each
script runs end to end, that its result file has the keys the README and ``run_all.py`` read,
and that the correctness checks built into the scripts (same means, same scores, steering
applied) pass - a benchmark that is fast because it is wrong must fail.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
COMMON_KEYS = {"benchmark", "command", "created", "hardware", "versions", "settings", "data", "model",
               "results", "targets", "all_targets_met", "workload"}
TARGET_KEYS = {"name", "value", "threshold", "comparison", "met", "note"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_quick(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    returned = _load(name).main(["--quick", "--device", "cpu", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned, default=str, sort_keys=True))
    assert COMMON_KEYS <= set(written)
    assert written["benchmark"] == name
    assert written["settings"]["quick"] is True and written["settings"]["device"] == "cpu"
    assert written["hardware"]["cpu_count"] >= 1 and "torch" in written["versions"]
    assert written["targets"] and all(TARGET_KEYS <= set(t) for t in written["targets"])
    return written


def _target(result: dict, prefix: str) -> dict:
    return next(t for t in result["targets"] if t["name"].startswith(prefix))


def test_extraction_quick(tmp_path):
    r = _run_quick("extraction", tmp_path)
    res = r["results"]
    for path in ("library", "paper_release", "hf_hidden_states"):
        assert res[path]["prompts_per_s"] > 0 and len(res[path]["seconds"]) >= 1
    assert res["library_vs_paper"] > 0
    assert _target(r, "means equal: library vs paper")["met"] is True
    assert _target(r, "means equal: library vs HF")["met"] is True


def test_guard_quick(tmp_path):
    r = _run_quick("guard", tmp_path)
    res = r["results"]
    for path in ("latent_guard", "full_forward", "generative_guard"):
        assert res[path]["items_per_s"] > 0
    assert res["latent_guard"]["decoder_layers_run"] < r["model"]["layers"]
    assert {"latent_vs_full_forward", "latent_vs_generative", "gpu_efficiency"} <= set(res)
    assert res["gpu_efficiency"].startswith("not measured")
    assert _target(r, "scores equal")["met"] is True


def test_steering_quick(tmp_path):
    r = _run_quick("steering", tmp_path)
    res = r["results"]
    assert res["plain"]["items_per_s"] > 0 and res["steered"]["items_per_s"] > 0
    assert isinstance(res["slowdown"], float)
    assert res["checks"] == {"coeff_zero_equals_plain": True, "large_coeff_changes_tokens": True,
                             "decoded_tokens_per_prompt": r["workload"]["new_tokens"]}


def test_memory_quick(tmp_path):
    r = _run_quick("memory", tmp_path)
    res = r["results"]
    assert len(res["runs"]) == 4
    for run in res["runs"].values():
        assert run["peak_bytes"] >= run["baseline_bytes"] > 0
        assert run["peak_above_baseline_bytes"] >= 0
    assert {"extraction_growth_10n_vs_n", "full_forward_vs_guard_peak_above_baseline"} <= set(res)


def test_preparation_quick(tmp_path):
    r = _run_quick("preparation", tmp_path)
    res = r["results"]
    for path in ("library", "plain_batched", "per_prompt"):
        assert res[path]["items_per_s"] > 0
    assert res["same_token_ids"] is True and res["library_vs_plain"] > 0
    assert _target(r, "token ids equal")["met"] is True


def test_serve_quick(tmp_path):
    r = _run_quick("serve", tmp_path)
    res = r["results"]
    assert set(res["concurrency"]) == {"1", "8", "32"}
    for level in res["concurrency"].values():
        assert level["requests_per_s"] > 0 and level["p99_ms"] >= level["p50_ms"] > 0
        assert level["latency_samples"] == r["workload"]["prompts"] and level["mean_batch"] >= 1
    assert res["concurrency"]["1"]["mean_batch"] == 1.0  # one client: nothing to batch
    assert res["in_process"]["items_per_s"] == max(res["in_process_main_thread"]["items_per_s"],
                                                   res["in_process_worker_thread"]["items_per_s"]) > 0
    assert res["verdicts_equal"] is True
    assert _target(r, "scores equal")["met"] is True


def test_reply_guard_quick(tmp_path):
    r = _run_quick("reply_guard", tmp_path)
    assert r["results"]["checks"] == {"same_replies": True, "every_token_but_last_judged": True}
    assert set(r["results"]["slowdown"]) == {"single", "batch"}
    assert _target(r, "guarded replies equal plain ones")["met"] is True
    assert r["workload"]["reply_guard"] == "random"


def test_reply_guard_bench_decodes_harmless_prompts():
    """The timed replies answer real harmless prompts (not the group names ``bench_prompts``
    returns beside them, which draw a one-line refusal)."""
    bench = _load("reply_guard")
    sys.path.insert(0, str(BENCH))
    import _common as C

    got = bench.reply_prompts(4)
    assert len(got) == 4 and len(set(got)) == 4 and set(got) <= set(C.alpaca_prompts())


def test_reply_guard_bench_times_a_saved_guards_own_read(tmp_path):
    """--reply-guard DIR: the saved guard's states and window are what is timed."""
    bench = _load("reply_guard")
    guard = bench.random_reply_guard(64, (2, 3))  # the tiny bench model's hidden size
    guard.threshold_ = 0.0
    guard.save(tmp_path / "rg")
    out = tmp_path / "r.json"
    r = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--reply-guard", str(tmp_path / "rg")])
    assert r["workload"]["states"] == [2, 3] and r["workload"]["reply_guard"] == str(tmp_path / "rg")
    assert r["results"]["checks"]["same_replies"] is True  # its threshold was lifted: nothing stopped


def test_common_timing_and_memory_helpers():
    sys.path.insert(0, str(BENCH))
    import _common as C
    import torch

    timing = C.time_call(lambda: sum(range(1000)), items=10, repeats=3, device=torch.device("cpu"))
    assert len(timing.seconds) == 3 and timing.per_second > 0
    t = C.check_target("x", 2.0, 3.0)
    assert t["met"] is False and C.check_target("y", 0.05, 0.1, "<=")["met"] is True
    assert C.check_target("z", None, 1.0)["met"] is None


@pytest.mark.parametrize("argv", [["--only", "extraction"]])
def test_run_all_quick_writes_summary(tmp_path, argv):
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--device", "cpu",
                           "--out-dir", str(tmp_path), *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == [] and set(summary["scripts"]) == {"extraction"}
    assert summary["scripts"]["extraction"]["targets"]
    assert json.loads((tmp_path / "extraction.json").read_text())["benchmark"] == "extraction"
    assert "| extraction: means equal" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow  # three torchrun launches (about a minute of start-up on 2 cores)
def test_distributed_quick(tmp_path):
    r = _run_quick("distributed", tmp_path)
    runs = r["results"]["runs"]
    assert {run["ranks"] for run in runs.values()} == {1, 2}
    assert all(run["timing"]["items_per_s"] > 0 for run in runs.values())
    assert _target(r, "directions equal: 2 ranks vs 1")["met"] is True
