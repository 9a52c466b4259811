"""The guard as a server: requests/s and latency at concurrency 1, 8 and 32 vs in-process scoring.

* ``in-process``: ``LatentGuard.decision_function`` on all prompts in one call (length-sorted
  batches of ``--batch-size``), from the main thread and from one long-lived worker thread (how
  the server runs the model): the throughput ceiling of the model on this machine. Both are
  measured because on an oversubscribed CPU torch's OpenMP threads waste far more time waiting
  when the work comes from the main thread; the target is taken against the faster of the two.
* ``server, concurrency c``: ``pyvene-harm serve`` in a child process on a localhost port, sent the
  same prompts as one-input ``POST /v1/moderations`` requests by ``c`` clients that each send
  their next request when the last one is answered (closed loop). The server scores concurrent
  requests together (dynamic batching, ``--max-batch``, ``--max-wait-ms``).

* ``in-process conversations``: ``LatentGuard.judge_conversations`` on the same prompts, each
  after a system message (three reads each: the system message, the user message, the user
  message in context): what judging every message the model reads costs a conversation that has
  more than one, against ``decision_function`` on the user messages alone (a lone user message
  is still one read, so moderation and single-message chat traffic pay nothing).

Contenders are timed in turns, as in the other benchmarks. Every server answer must equal the
in-process score (Delta_harmful within a float tolerance, the same verdict) or the run fails.

    python benchmarks/bench_serve.py             # CPU: demo model, 128 prompts
    python benchmarks/bench_serve.py --quick
    python benchmarks/bench_serve.py --chat      # guarded chat: vLLM-backed and in-process (bench_serve_chat.py)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from bench_guard import build_latent_guard, guard_layers  # noqa: E402

from pyvene_harm.positions import ChatFormatter  # noqa: E402
from pyvene_harm.serve import ServerProcess  # noqa: E402

NAME = "serve"
CONCURRENCY = (1, 8, 32)
SYSTEM = "You are a careful assistant. Answer briefly and say when you are unsure."


async def _drive(url: str, prompts: Sequence[str], concurrency: int, latencies: list[float]) -> list[dict]:
    """Send each prompt as one moderation request from ``concurrency`` closed-loop clients."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[Any] = [None] * len(prompts)
    todo = iter(range(len(prompts)))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def client_loop() -> None:
            for i in todo:
                start = time.perf_counter()
                r = await client.post("/v1/moderations", json={"input": prompts[i]})
                latencies.append(time.perf_counter() - start)
                r.raise_for_status()
                results[i] = r.json()["results"][0]

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


def drive(url: str, prompts: Sequence[str], concurrency: int, latencies: list[float]) -> list[dict]:
    return asyncio.run(_drive(url, prompts, concurrency, latencies))


def health(url: str) -> dict[str, Any]:
    return httpx.get(url + "/health", timeout=30).json()["worker"]


def served_model(bm: C.BenchModel, folder: Path) -> tuple[str, C.BenchModel]:
    """What the server's ``-m`` gets (``demo``, or this random model saved to ``folder``), and the
    model as the server loads it: a saved tokenizer can come back as another class that splits
    text differently, so both sides must use the reloaded one."""
    if bm.name in C.REAL_MODELS:
        return bm.name, bm
    from pyvene_harm.models import load_model

    bm.model.save_pretrained(folder)
    bm.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), dtype=bm.dtype, device=str(bm.device))
    return str(folder), dataclasses.replace(bm, model=loaded.model, tokenizer=loaded.tokenizer)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--chat" in argv:  # chat under load has its own contenders and options
        import bench_serve_chat

        return bench_serve_chat.main([a for a in argv if a != "--chat"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, name=NAME)
    parser.add_argument("--n", type=int, default=None, help="prompts per contender and repeat (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass, both sides")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=250.0,
                        help="the server's --max-wait-ms (a CPU batch takes seconds: wait for the burst)")
    parser.add_argument("--max-gap-ms", type=float, default=50.0, help="the server's --max-gap-ms")
    parser.add_argument("--depth", type=float, default=2 / 3, help="fraction of the layers the guard reads")
    args = parser.parse_args(argv)
    s = C.resolve_settings(args, repeats=2)
    s = dataclasses.replace(s, model=args.model or ("tiny" if s.quick else "demo"))
    n = args.n or (16 if s.quick else 128)

    dtype = str(s.dtype).removeprefix("torch.")
    prompts, _ = C.bench_prompts(n)
    warm = prompts[:4]
    train, train_labels = C.bench_prompts(8 if s.quick else 32, seed=1)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        spec, bm = served_model(C.load_bench_model(s.model, device=s.device, dtype=s.dtype), Path(tmp) / "model")
        guard = build_latent_guard(bm.model, bm.tokenizer, ChatFormatter(bm.tokenizer),
                                   layers=guard_layers(bm.n_layers, args.depth), batch_size=args.batch_size,
                                   train_prompts=train, train_y=[int(g == "harmful") for g in train_labels])
        guard.save(Path(tmp) / "guard")
        server_args = ["--guard", str(Path(tmp) / "guard"), "-m", spec,
                       "--device", str(s.device), "--dtype", dtype, "--batch-size", str(args.batch_size),
                       "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                       "--max-gap-ms", str(args.max_gap_ms),
                       "--max-queue", "4096", "--log-level", "warning"]
        C.log(f"starting the server: pyvene-harm serve {' '.join(server_args)}")
        with ServerProcess(server_args, log=Path(tmp) / "server.log") as server:
            scores: dict[str, Any] = {}
            latencies: dict[int, list[float]] = {c: [] for c in CONCURRENCY}
            batches: dict[int, list[int]] = {c: [0, 0] for c in CONCURRENCY}  # [batches, prompts]

            def in_process() -> None:
                scores["in_process"] = guard.decision_function(prompts) + guard.threshold_

            conversations = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in prompts]

            def in_process_conversations() -> None:
                scores["conversations"] = guard.judge_conversations(conversations)

            def in_worker_thread() -> None:
                scores["in_worker_thread"] = worker.submit(guard.decision_function, prompts).result() \
                    + guard.threshold_

            def served(c: int):
                def run() -> None:
                    before = health(server.url)
                    scores[c] = drive(server.url, prompts, c, latencies[c])
                    after = health(server.url)
                    batches[c][0] += after["batches"] - before["batches"]
                    batches[c][1] += after["prompts_scored"] - before["prompts_scored"]
                return run

            calls = {"in-process": (in_process, n), "in-process thread": (in_worker_thread, n),
                     "in-process conversations": (in_process_conversations, n),
                     **{f"server c={c}": (served(c), n) for c in CONCURRENCY}}
            warmups = {"in-process": lambda: guard.decision_function(warm),
                       "in-process thread": lambda: worker.submit(guard.decision_function, warm).result(),
                       "in-process conversations": lambda: guard.judge_conversations(conversations[:4]),
                       **{f"server c={c}": (lambda c=c: drive(server.url, warm, c, [])) for c in CONCURRENCY}}
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="in-process-model") as worker:
                timings = C.time_interleaved(calls, repeats=s.repeats, device=s.device, warmups=warmups)
            server_log = server.output(2000)

    main_thread, thread = timings["in-process"], timings["in-process thread"]
    base = max(main_thread, thread, key=lambda t: t.per_second)
    want = np.asarray(scores["in_process"], dtype=np.float64)
    thread_diff = float(np.abs(np.asarray(scores["in_worker_thread"]) - want).max())
    tol = 1e-4 if dtype == "float32" else 2e-2
    worst, verdicts_equal = thread_diff, True
    for c in CONCURRENCY:
        got = np.array([r["delta_harmful"] for r in scores[c]])
        worst = max(worst, float(np.abs(got - want).max()))
        verdicts_equal &= [r["flagged"] for r in scores[c]] == (want > guard.threshold_).tolist()
    levels: dict[str, Any] = {}
    rows = [["in-process decision_function, main thread", main_thread.per_second, "-", "-", "-",
             main_thread.per_second / base.per_second],
            ["in-process decision_function, one worker thread", thread.per_second, "-", "-", "-",
             thread.per_second / base.per_second]]
    conv = timings["in-process conversations"]
    rows.append(["in-process judge_conversations, system + user message", conv.per_second, "-", "-", "-",
                 conv.per_second / base.per_second])
    for c in CONCURRENCY:
        t = timings[f"server c={c}"]
        p50, p99 = (float(x) * 1000 for x in np.percentile(latencies[c], [50, 99]))
        mean_batch = batches[c][1] / max(1, batches[c][0])
        levels[str(c)] = {**t.to_dict(), "requests_per_s": round(t.per_second, 4), "p50_ms": round(p50, 2),
                          "p99_ms": round(p99, 2), "latency_samples": len(latencies[c]),
                          "mean_batch": round(mean_batch, 2), "batches": batches[c][0],
                          "vs_in_process": round(t.per_second / base.per_second, 3)}
        rows.append([f"server, concurrency {c}", t.per_second, p50, p99, mean_batch, t.per_second / base.per_second])
    C.print_table(f"serving the guard: {bm.name} ({s.device}), {n} prompts, forward batch {args.batch_size}, "
                  f"--max-batch {args.max_batch}",
                  ["path", "prompts/s", "p50 ms", "p99 ms", "mean batch", "vs faster in-process"], rows)
    print(f"max |server - in-process| of Delta_harmful: {worst:.2e} (tolerance {tol:g}); "
          f"verdicts equal: {verdicts_equal}")
    results = {"in_process": base.to_dict(), "in_process_main_thread": main_thread.to_dict(),
               "in_process_worker_thread": thread.to_dict(),
               "in_process_baseline": "worker thread" if base is thread else "main thread", "concurrency": levels,
               "c32_vs_in_process": levels["32"]["vs_in_process"],
               "conversations": {**conv.to_dict(), "reads_per_conversation": 3,
                                 "cost_vs_one_message": round(main_thread.per_second / conv.per_second, 3)},
               "max_abs_score_difference": worst,
               "score_tolerance": tol, "verdicts_equal": verdicts_equal}
    targets = [
        C.check_target("server at concurrency 32 vs the faster in-process decision_function, prompts/s ratio",
                       results["c32_vs_in_process"], 0.7),
        C.check_target("scores equal: server vs in-process (max abs diff)", worst, tol, "<="),
        C.check_target("verdicts equal: server vs in-process", float(verdicts_equal), 1.0),
    ]
    C.print_targets(targets)
    payload = C.write_results(args.out, benchmark=NAME, settings=s, model=bm.describe(), results=results,
                              targets=targets, extra={"workload": {
                                  "prompts": n, "batch_size": args.batch_size, "max_batch": args.max_batch,
                                  "max_wait_ms": args.max_wait_ms, "max_gap_ms": args.max_gap_ms,
                                  "concurrency": list(CONCURRENCY),
                                  "depth": args.depth, "train_prompts": len(train),
                                  "client": "httpx.AsyncClient, one-input POST /v1/moderations, closed loop"}})
    print(f"wrote {args.out}")
    if worst > tol or not verdicts_equal:
        raise SystemExit(f"the server's answers differ from in-process scoring (max {worst:.3g}); server log:\n"
                         f"{server_log}")
    return payload


if __name__ == "__main__":
    main()
