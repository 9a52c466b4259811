"""Data-parallel runs on torch.distributed (gloo on CPU): 2 and 3 ranks vs one process.

Real multi-process jobs on a tiny model: every rank is its own process with torchrun's
environment variables (started from a fork server, see ``dist_worker.py``, so that a job
starts in well under a second), plus one real ``torchrun -m pyvene_harm`` launch. Each rank
and the single process use one thread, as torchrun gives each rank: CPU kernels split some
reductions by thread count, so only the number of ranks may change, not the threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch

from dist_worker import HARMFUL, HARMLESS, Failure, Job, run_job
from tiny import make_model, make_tokenizer

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="multi-process tests need Linux and torch.distributed")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    make_model("qwen2").save_pretrained(root / "model")
    make_tokenizer("qwen2.5").save_pretrained(root / "model")
    (root / "harmful.json").write_text(json.dumps([{"instruction": x} for x in HARMFUL]))
    (root / "harmless.json").write_text(json.dumps([{"instruction": x} for x in HARMLESS]))
    return root


def _recipes(root: Path, out: Path) -> list[list[str]]:
    """Every data-parallel command, on this job's own extraction."""
    m = ["-m", str(root / "model"), "--batch-size", "3"]
    hf, hl, ext = str(root / "harmful.json"), str(root / "harmless.json"), str(out / "extract")
    return [
        ["extract", *m, "-o", ext, "--harmful", hf, "--harmless", hl, "--max-new-tokens", "3"],
        ["beliefs", *m, "-o", str(out / "beliefs"), "--directions", ext, "--set", f"harmful={hf}",
         "--set", f"harmless={hl}"],
        ["cluster", *m, "-o", str(out / "cluster"), "--harmful", hf, "--harmless", hl, "--max-new-tokens", "2"],
        ["post-inst", *m, "-o", str(out / "post-inst"), "--harmful", hf, "--max-new-tokens", "2"],
        ["elicit", *m, "-o", str(out / "elicit"), "--directions", ext, "--harmless", hl, "--layers", "1-2",
         "--max-new-tokens", "2", "--coeff", "4"],
        ["invert", *m, "-o", str(out / "invert"), "--directions", ext, "--harmless", hl, "--harmful", hf,
         "--layers", "1", "--max-new-tokens", "2"],
        ["guard", "eval", "--guard", str(root / "guard"), "--batch-size", "3", "-o", str(out / "guard-eval"),
         "--set", f"h={hf}:harmful", "--set", f"l={hl}:harmless", "--max-new-tokens", "2"],
        ["guard", "fit", *m, "--design", "lin:method=linear,reads=mean_inst,layers=1-2,C=1,augment=1",
         "--harmful", hf, "--harmless", hl, "-o", str(out / "guard-fit")],
    ]


def _beliefs(root: Path, out: Path) -> list[str]:
    return ["beliefs", "-m", str(root / "model"), "--batch-size", "3", "-o", str(out), "--directions",
            str(root / "w1" / "extract"), "--set", f"harmful={root / 'harmful.json'}",
            "--set", f"harmless={root / 'harmless.json'}"]


def _no_split(root: Path, out: Path) -> list[str]:
    return ["extract", "-m", str(root / "model"), "--batch-size", "3", "-o", str(out), "--no-split",
            "--harmful", str(root / "harmful.json"), "--harmless", str(root / "harmless.json")]


@pytest.fixture(scope="module")
def jobs(root) -> dict[int, Job]:
    """The same commands in one process, on 2 ranks and on 3 ranks."""
    fit = ["guard", "fit", "-m", str(root / "model"), "--batch-size", "3", "--harmful", str(root / "harmful.json"),
           "--harmless", str(root / "harmless.json"), "-o", str(root / "guard")]
    one = [fit, *_recipes(root, root / "w1"), _no_split(root, root / "w1" / "extract-no-split")]
    out = {1: run_job(Job(1, one, root / "logs1"))}
    for w in (2, 3):
        out[w] = run_job(Job(w, _recipes(root, root / f"w{w}"), root / f"logs{w}"))
    return out


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_run(a: Path, b: Path, *, paths: tuple[str, str] = ("", "")) -> None:
    """Byte-identical run directories, apart from the creation time of a DirectionSet and the
    job's own folder where an option names it (``paths``: (b's, a's))."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        x, y = fa[rel].read_bytes(), fb[rel].read_bytes()
        if paths[0]:
            y = y.replace(paths[0].encode(), paths[1].encode())
        if rel.endswith("directions.json"):
            x, y = (json.loads(v) for v in (x, y))
            x.pop("created"), y.pop("created")
        assert x == y, f"{rel} differs between {a} and {b}"


def test_two_and_three_ranks_write_what_one_process_writes(root, jobs):
    from pyvene_harm.directions import DirectionSet

    for w, job in jobs.items():
        assert job.exit_codes == [0] * w, job.log(0)[-3000:]
        for rank in range(1, w):
            assert job.log(rank) == "", f"rank {rank} printed: {job.log(rank)[:500]}"
    ref = root / "w1"
    for w in (2, 3):
        for name in ("extract", "beliefs", "cluster", "post-inst", "elicit", "invert", "guard-eval"):
            assert_same_run(ref / name, root / f"w{w}" / name, paths=(f"/w{w}/", "/w1/"))
        a, b = DirectionSet.load(ref / "extract" / "directions"), DirectionSet.load(root / f"w{w}" / "extract" / "directions")
        for k in a.centroids:  # bit-identical: stronger than the 1e-10 relative the issue asks
            assert torch.equal(a.centroids[k], b.centroids[k]), k
        # a linear guard fitted on the ranks' gathered states is the one-process guard, to the bit
        fitted = [json.loads((d / "guard-fit" / "guard.json").read_text()) for d in (ref, root / f"w{w}")]
        for meta in fitted:
            meta.pop("created"), meta["extra"].pop("fitted_with")
        assert fitted[0] == fitted[1]
        assert ((ref / "guard-fit" / "guard.safetensors").read_bytes()
                == (root / f"w{w}" / "guard-fit" / "guard.safetensors").read_bytes())
    guard = json.loads((ref / "guard-eval" / "results.json").read_text())
    assert {s["n"] for s in guard["sets"]} == {len(HARMFUL)}
    assert "directions per layer" in jobs[2].log(0)  # rank 0 prints the table


def test_a_killed_rank_stops_the_job_and_the_rerun_resumes(root, jobs):
    out = root / "killed"
    job = run_job(Job(2, [_beliefs(root, out)], root / "logs-killed", timeout=30,
                      failure=Failure(rank=1, call=4, how="kill")))  # mid second unit
    assert job.exit_codes == [1, -9]
    assert "rank 1 ended without an error message" in job.log(0) and "killed" in job.log(0)
    assert job.seconds < 30
    # rank 0 wrote the unit finished before the failure, nothing of the unfinished one, no temp file
    assert sorted(_files(out)) == ["config.json", "units/beliefs_harmful.json"]
    kept = os.stat(out / "units" / "beliefs_harmful.json")
    again = run_job(Job(2, [_beliefs(root, out)], root / "logs-resumed"))
    assert again.exit_codes == [0, 0], again.log(0)[-3000:]
    after = os.stat(out / "units" / "beliefs_harmful.json")
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not recomputed
    assert_same_run(root / "w1" / "beliefs", out)


def test_out_of_memory_on_a_rank_names_the_rank_and_the_cause(root, jobs):
    out = root / "oom"
    job = run_job(Job(2, [_beliefs(root, out)], root / "logs-oom", timeout=30,
                      failure=Failure(rank=1, call=4, how="oom")))
    assert job.exit_codes == [1, 1]
    assert "rank 1 failed: OutOfMemoryError: CUDA out of memory" in job.log(0)
    assert job.log(1).strip().splitlines() == [
        "pyvene-harm rank 1/2: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"]
    assert sorted(_files(out)) == ["config.json", "units/beliefs_harmful.json"]


def test_a_stuck_rank_is_named_after_the_timeout(root, jobs):
    job = run_job(Job(2, [_beliefs(root, root / "stuck")], root / "logs-stuck", timeout=5,
                      failure=Failure(rank=1, call=4, how="hang")))
    assert job.exit_codes[0] == 1
    assert "rank 1 did not reach step" in job.log(0) and "within 5 s" in job.log(0)
    assert job.seconds < 20


def test_device_auto_and_single_process_commands_are_refused(root):
    auto = run_job(Job(2, [[*_no_split(root, root / "auto"), "--device", "auto"]], root / "logs-auto"))
    assert auto.exit_codes == [2, 2]
    assert "--device auto" in auto.log(0) and "one copy of the model per rank" in auto.log(0)
    score = run_job(Job(2, [["guard", "score", "--guard", str(root / "guard"), "How do I bake bread?"]],
                        root / "logs-score"))
    assert score.exit_codes == [2, 2] and "`guard score` does not run data-parallel" in score.log(0)
    assert not (root / "auto").exists()


def test_torchrun_launch_of_the_module(root, jobs):
    """``torchrun -m pyvene_harm`` itself: its environment, its store, ``__main__``."""
    out = root / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "pyvene_harm", "--dist-timeout=60", *_no_split(root, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "directions per layer" in proc.stderr
    assert_same_run(root / "w1" / "extract-no-split", out, paths=("/torchrun", "/w1/extract-no-split"))


# --------------------------------------------------------------------------- in this process


def test_a_single_process_is_left_alone(monkeypatch):
    from pyvene_harm import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched()
    with distributed.data_parallel() as dp:
        assert dp is None and distributed.is_main() and distributed.active() is None
        assert distributed.on_main(lambda: 7) == 7
        assert distributed.gather_rows({1: "b", 0: "a"}, 2) == ["a", "b"]
    assert distributed.device_for("auto") == "auto" and distributed.device_for(None) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: still a single process
    assert not distributed.launched()


def test_device_placement_under_a_launch(monkeypatch):
    from pyvene_harm import distributed
    from pyvene_harm.recipes.launch import check_data_parallel
    from pyvene_harm.recipes.options import ModelOptions

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="cannot be combined with torchrun"):
        distributed.device_for("auto")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        distributed.device_for("cuda:3")
    assert distributed.device_for("cuda") == "cuda:1" and distributed.device_for("cpu") == "cpu"
    assert distributed.device_for(None) == ("cuda:1" if torch.cuda.is_available() else "cpu")
    with pytest.raises(click.BadParameter, match="--device auto"):
        ModelOptions("demo", "auto", "auto", 16, None)
    check_data_parallel("guard", ["eval", "--guard", "g"])
    check_data_parallel("extract", ["-m", "demo"])
    check_data_parallel("guard", ["fit", "--help"])
    with pytest.raises(click.UsageError, match="`finetune` does not run data-parallel"):
        check_data_parallel("finetune", [])
