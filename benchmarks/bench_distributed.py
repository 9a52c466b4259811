"""Data-parallel extraction: prompts/s of ``extract_directions`` with 1 vs N ranks (torchrun).

The same prompts (half AdvBench, half Alpaca), the same model and options, launched once per
rank count with ``python -m torch.distributed.run --standalone --nproc-per-node N``; every
rank loads its own copy of the model (``cuda:LOCAL_RANK`` on GPUs, the CPU otherwise). Timed:
the whole ``extract_directions`` call (greedy replies to split by refusal, then collection of
all L+1 states at t_inst and t_post_inst), between two barriers, after a warm-up on a few
prompts; model loading is not timed. The directions of every rank count are compared with the
single rank's: they must be equal (max relative difference <= 1e-10), else the run fails.

On CPU torchrun gives each of N ranks one thread (``OMP_NUM_THREADS=1``) while one rank uses
every core, so on a 2-core machine two ranks share the same two cores: expect little gain.
The speed-up is against one rank using every core; exactness is checked against one rank with
the N ranks' thread count as well, because CPU kernels split some reductions by thread count
and so round float32 differently (results do not depend on the number of ranks, but can on
the threads per rank).

    python benchmarks/bench_distributed.py                     # CPU: demo model, 32 prompts, 1 vs 2 ranks
    python benchmarks/bench_distributed.py --quick             # tiny random model, seconds of work
    python benchmarks/bench_distributed.py --device cuda --ranks 1,8 --prompts 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "distributed"
EXACT = 1e-10


def _worker(args: argparse.Namespace) -> None:
    """One rank: load the model on this rank's device, time extraction, rank 0 writes JSON."""
    import torch.distributed as dist

    from pyvene_harm import DirectionSet, extract_directions
    from pyvene_harm.distributed import data_parallel, device_for, is_main

    with data_parallel(timeout=1800) as dp:
        ranks = dp.world_size if dp is not None else 1
        device = torch.device(device_for("cuda" if args.device == "cuda" else None) or "cpu")
        bm = C.load_bench_model(args.model, device=device, dtype=C.DTYPES[args.dtype])
        prompts, labels = C.bench_prompts(args.n)
        harmful = [p for p, g in zip(prompts, labels) if g == "harmful"]
        harmless = [p for p, g in zip(prompts, labels) if g == "harmless"]

        def run(hf: Sequence[str], hl: Sequence[str]) -> DirectionSet:
            return extract_directions(bm.model, bm.tokenizer, hf, hl, split_by_refusal=not args.no_split,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size).directions

        def barrier() -> None:
            C.sync(device)
            if dp is not None:
                dist.barrier()

        with_groups = harmful[:2] + harmful[-2:], harmless[:2] + harmless[-2:]
        try:
            run(*with_groups)  # warm-up (a split may find no refusals among 4 prompts: that is fine)
        except ValueError:
            pass
        seconds, directions = [], None
        load = [round(x, 2) for x in os.getloadavg()]
        for _ in range(args.repeats):
            barrier()
            start = time.perf_counter()
            directions = run(harmful, harmless)
            barrier()
            seconds.append(time.perf_counter() - start)
        if is_main():
            directions.save(Path(args.worker) / "directions")
            result = {"ranks": ranks, "device": str(device), "threads_per_rank": torch.get_num_threads(),
                      "model": bm.describe(), "timing": C.Timing(seconds, len(prompts)).to_dict(),
                      "group_sizes": directions.metadata.get("group_sizes"),
                      "load_average_before_after": [load, [round(x, 2) for x in os.getloadavg()]]}
            (Path(args.worker) / "result.json").write_text(json.dumps(result, default=str))


def _launch(ranks: int, args: argparse.Namespace, folder: Path, *, threads: int | None = None,
            repeats: int | None = None) -> dict[str, Any]:
    """One torchrun job; ``threads`` sets OMP_NUM_THREADS (None: torchrun's default)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(Path(__file__).resolve()), "--worker", str(folder), "--model", args.model_name,
           "--dtype", args.dtype_name, "--prompts", str(args.n), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(repeats or args.repeats_n),
           *(["--device", "cuda"] if args.on_cuda else []), *(["--no-split"] if args.no_split else [])]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    C.log(f"{ranks} rank(s), OMP_NUM_THREADS={threads or 'torchrun default'}: {' '.join(cmd[1:6])} ...")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 or not (folder / "result.json").is_file():
        raise RuntimeError(f"the {ranks}-rank run failed (exit code {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((folder / "result.json").read_text())


def max_relative_difference(a, b) -> float:
    """Max over centroids and directions of ``||a - b|| / ||b||`` (per state), in float64."""
    worst = 0.0
    pairs = [(a.centroids[k], b.centroids[k]) for k in b.centroids]
    pairs += [(a.harmfulness, b.harmfulness), (a.refusal, b.refusal)]
    for x, y in pairs:
        x, y = x.double(), y.double()
        worst = max(worst, float(((x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)).max()))
    return worst


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, name=NAME)
    parser.add_argument("--ranks", default=None, help="rank counts to compare, the first is the baseline "
                        "(default 1,2 on CPU, 1,<number of GPUs> on CUDA)")
    parser.add_argument("--prompts", dest="n", type=int, default=None, help="prompts, half harmful (default 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="reply tokens to judge refusal (default 24)")
    parser.add_argument("--no-split", action="store_true", help="skip the refusal split (collection only)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        args.model = args.model or "demo"
        args.dtype = args.dtype or "float32"
        args.n = args.n or 32
        args.max_new_tokens = args.max_new_tokens or 24
        args.repeats = args.repeats or 1
        _worker(args)
        return {}
    s = C.resolve_settings(args, repeats=3)
    args.model_name, args.on_cuda, args.repeats_n = s.model, s.on_cuda, s.repeats
    args.dtype_name = str(s.dtype).removeprefix("torch.")
    args.n = args.n or (8 if s.quick else 32)
    args.max_new_tokens = args.max_new_tokens or (3 if s.quick else 24)
    if s.quick:  # a random model never refuses in words: collection only
        args.batch_size, args.no_split = min(args.batch_size, 2), True
    default_ranks = f"1,{torch.cuda.device_count()}" if s.on_cuda else "1,2"
    counts = [int(x) for x in (args.ranks or default_ranks).split(",")]

    from pyvene_harm import DirectionSet

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directions = {}
        plan = [(f"{k}", k, None, None) for k in counts]
        if not s.on_cuda:  # the exactness baseline: one rank with the N ranks' one thread
            plan.insert(1, (f"{counts[0]}-1thread", counts[0], 1, 1))
        for name, k, threads, repeats in plan:
            runs[name] = _launch(k, args, Path(tmp) / name, threads=threads, repeats=repeats)
            directions[name] = DirectionSet.load(Path(tmp) / name / "directions")
    same = f"{counts[0]}-1thread" if not s.on_cuda else f"{counts[0]}"
    base = runs[f"{counts[0]}"]["timing"]
    rows, results = [], {"prompts": args.n, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                         "split_by_refusal": not args.no_split, "runs": {}}
    diffs = {}
    for name, run in runs.items():
        speedup = base["median_s"] / run["timing"]["median_s"]
        d_same = max_relative_difference(directions[name], directions[same])
        d_base = max_relative_difference(directions[name], directions[f"{counts[0]}"])
        if run["ranks"] != counts[0]:
            diffs[run["ranks"]] = d_same
        results["runs"][name] = {**run, "speedup_vs_one_rank": round(speedup, 4),
                                 "max_relative_difference_vs_one_rank_same_threads": d_same,
                                 "max_relative_difference_vs_one_rank_all_cores": d_base}
        rows.append([f"{run['ranks']} rank(s) x {run['threads_per_rank']} thread(s)", run["timing"]["items_per_s"],
                     run["timing"]["median_s"], f"{speedup:.2f}x", f"{d_same:.2g}", f"{d_base:.2g}"])
    C.print_table(f"extract_directions, {args.n} prompts, {s.model} ({'cuda' if s.on_cuda else 'cpu'})",
                  ["ranks", "prompts/s", "median s", "speed-up", "max rel. diff vs 1 rank, same threads",
                   "vs 1 rank, all cores"], rows)
    targets = [C.check_target(f"directions equal: {k} ranks vs {counts[0]}, same threads per rank "
                              "(max relative difference)", d, EXACT, "<=") for k, d in diffs.items()]
    C.print_targets(targets)
    out = C.write_results(args.out, benchmark=NAME, settings=s, model=runs[f"{counts[0]}"]["model"], results=results,
                          targets=targets, extra={"workload": f"extract_directions on {args.n} prompts"})
    if not out["all_targets_met"]:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
