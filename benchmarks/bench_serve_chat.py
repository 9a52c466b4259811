"""Guarded chat under load: the server with a vLLM engine behind it, and decoding in-process.

``python benchmarks/bench_serve.py --chat`` (or this file) runs, for each number of closed-loop
clients (8 and 32 by default; each asks one question and waits for its whole reply, streamed):

* ``vLLM alone``: the engine's ``/v1/completions``, given the very token ids the guard server
  would send it (the same prompts, rendered and tokenised by the guard's formatter);
* ``guarded, vLLM``: ``pyvene-harm serve --upstream`` in front of that engine: the guard judges
  each conversation, then the engine writes the reply;
* ``guarded, in-process``: ``pyvene-harm serve`` decoding the replies itself;
* ``batched generate``: one ``model.generate`` call on the same prompts (left-padded), the
  ceiling of in-process decoding on this machine.

Replies are greedy, ``--max-tokens`` long at most, to prompts the guard lets through (checked
first, in-process). Reported per contender: completion tokens/s, p50/p99 latency, p50 time to
first token. The ratios the serving issue sets targets for are measured in the same run:
guarded-vLLM / vLLM alone (>= 0.9) and guarded in-process / batched generate (>= 0.8).

vLLM runs from its own environment (``--vllm-python``, default ``.venv-vllm/bin/python``).

    python benchmarks/bench_serve_chat.py                 # CPU: demo model, 8 and 32 clients
    python benchmarks/bench_serve_chat.py --clients 2,4 --max-tokens 16 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "serve_chat"
SERVED = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
GUARD = ROOT / "artifacts" / "qwen2.5-coder-0.5b-instruct" / "guard"


async def _one(client: httpx.AsyncClient, path: str, body: dict[str, Any], chat: bool) -> dict[str, float]:
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"{path}: {chunk['error']}")
            for choice in chunk.get("choices") or ():  # the first piece of text marks the first token
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece and first is None:
                    first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


async def _drive(url: str, path: str, bodies: Sequence[dict[str, Any]], clients: int, chat: bool) -> list[dict]:
    todo, out = iter(bodies), []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=3600) as client:
        async def loop() -> None:
            for body in todo:
                out.append(await _one(client, path, body, chat))

        await asyncio.gather(*(loop() for _ in range(clients)))
    return out


def drive(url: str, path: str, bodies: Sequence[dict[str, Any]], clients: int, chat: bool) -> dict[str, Any]:
    start = time.perf_counter()
    rows = asyncio.run(_drive(url, path, bodies, clients, chat))
    wall = time.perf_counter() - start
    return summarise(wall, [r["tokens"] for r in rows], [r["latency"] for r in rows], [r["ttft"] for r in rows])


def summarise(wall: float, tokens: Sequence[int], latency: Sequence[float], ttft: Sequence[float]) -> dict[str, Any]:
    p50, p99 = np.percentile(latency, [50, 99])
    return {"wall_s": round(wall, 3), "completion_tokens": int(sum(tokens)),
            "tokens_per_s": round(sum(tokens) / wall, 3), "p50_latency_s": round(float(p50), 3),
            "p99_latency_s": round(float(p99), 3), "p50_ttft_s": round(float(np.median(ttft)), 3),
            "requests": len(tokens)}


def batched_generate(model: Any, formatter: Any, prompts: Sequence[str], max_tokens: int) -> dict[str, Any]:
    from pyvene_harm.generation import generate_ids, greedy_config

    config = greedy_config(model, formatter.tokenizer, max_tokens)
    eos = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    batch = formatter.encode(list(prompts), padding_side="left")
    start = time.perf_counter()
    ids = generate_ids(model, batch, config)
    wall = time.perf_counter() - start
    tokens = []
    for row in ids[:, batch.seq_len:].tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        tokens.append(n)
    return summarise(wall, tokens, [wall] * len(tokens), [0.0] * len(tokens))


def prompts_let_through(guard: Any, n: int) -> list[str]:
    """``n`` harmless benchmark prompts the guard lets through: what is timed is their replies."""
    candidates, groups = C.bench_prompts(4 * n, max_chars=300)
    harmless = [p for p, g in zip(candidates, groups) if g != "harmful"]
    let_through = [p for p, flagged in zip(harmless, guard.predict(harmless).tolist()) if not flagged]
    if len(let_through) < n:
        raise SystemExit(f"only {len(let_through)} prompts pass the guard; need {n}")
    return let_through[:n]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="8,32", help="closed-loop client counts, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest reply (greedy)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each contender (the median is kept)")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                        help="the interpreter of vLLM's own environment")
    parser.add_argument("--guard-threads", type=int, default=None,
                        help="torch threads of the guard server in front of vLLM (serve --threads; default: all cores)")
    parser.add_argument("--skip-in-process", action="store_true", help="leave out the in-process server")
    parser.add_argument("--out", type=Path, default=C.RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    settings = C.Settings(quick=False, device=C.torch.device("cpu"), model="demo", dtype=C.torch.float32,
                          repeats=args.repeats)

    from pyvene_harm.builtin_models import prepare_demo
    from pyvene_harm.guard import LatentGuard
    from pyvene_harm.models import load_model
    from pyvene_harm.serve import ServerProcess, VllmProcess

    loaded = load_model("demo", dtype="float32", device="cpu")
    guard = LatentGuard.from_pretrained(str(GUARD), loaded.model, loaded.tokenizer)
    fmt = guard.chat_formatter()
    prompts = prompts_let_through(guard, max(clients))
    ids = [list(e.ids) for e in fmt.tokenize(prompts)]
    chat_body = lambda p: {"model": SERVED, "messages": [{"role": "user", "content": p}],  # noqa: E731
                           "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    engine_body = lambda i: {"model": SERVED, "prompt": i, "max_tokens": args.max_tokens,  # noqa: E731
                             "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def record(contender: str, c: int, result: dict[str, Any]) -> None:
        runs.setdefault(contender, {}).setdefault(str(c), []).append(result)
        C.log(f"{contender}, {c} clients: {result['tokens_per_s']:.2f} tokens/s, p50 {result['p50_latency_s']:.2f} s")

    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        C.log("starting vLLM and the guard server in front of it")
        with VllmProcess(args.vllm_python, prepare_demo(), served_name=SERVED) as engine, \
                ServerProcess(["-m", "demo", "--guard", str(GUARD), "--upstream", engine.url, "--log-level",
                               "warning", "--max-queue", "4096",
                               *(["--threads", str(args.guard_threads)] if args.guard_threads else [])], log=Path(tmp) / "guard.log") as front:
            drive(engine.url, "/v1/completions", [engine_body(i) for i in ids[:2]], 2, chat=False)  # warm-up
            drive(front.url, "/v1/chat/completions", [chat_body(p) for p in prompts[:2]], 2, chat=True)
            for c in clients:
                for _ in range(args.repeats):  # in turns, so drift hits both alike
                    record("vllm_alone", c, drive(engine.url, "/v1/completions",
                                                  [engine_body(i) for i in ids[:c]], c, chat=False))
                    record("guarded_vllm", c, drive(front.url, "/v1/chat/completions",
                                                    [chat_body(p) for p in prompts[:c]], c, chat=True))
        if not args.skip_in_process:
            C.log("starting the in-process server")
            with ServerProcess(["-m", "demo", "--guard", str(GUARD), "--log-level", "warning", "--max-queue", "4096"],
                               log=Path(tmp) / "inproc.log") as inproc:
                drive(inproc.url, "/v1/chat/completions", [chat_body(prompts[0])], 1, chat=True)
                for c in clients:
                    for _ in range(args.repeats):
                        record("guarded_in_process", c, drive(inproc.url, "/v1/chat/completions",
                                                              [chat_body(p) for p in prompts[:c]], c, chat=True))
        batched_generate(loaded.model, fmt, prompts[:2], 4)  # warm-up
        for c in clients:
            for _ in range(args.repeats):
                record("batched_generate", c, batched_generate(loaded.model, fmt, prompts[:c], args.max_tokens))

    def median(contender: str, c: int) -> dict[str, Any] | None:
        rows = runs.get(contender, {}).get(str(c))
        if not rows:
            return None
        return sorted(rows, key=lambda r: r["tokens_per_s"])[len(rows) // 2]

    table, results, targets = [], {"runs": runs, "ratios": {}}, []
    for c in clients:
        base = median("batched_generate", c)
        for contender in ("vllm_alone", "guarded_vllm", "guarded_in_process", "batched_generate"):
            m = median(contender, c)
            if m is not None:
                table.append([f"{contender}, {c} clients", m["tokens_per_s"], m["p50_latency_s"], m["p99_latency_s"],
                              m["p50_ttft_s"], m["tokens_per_s"] / base["tokens_per_s"]])
        ratios = {"guarded_vllm_vs_vllm": median("guarded_vllm", c)["tokens_per_s"]
                  / median("vllm_alone", c)["tokens_per_s"],
                  "vllm_vs_batched_generate": median("vllm_alone", c)["tokens_per_s"] / base["tokens_per_s"]}
        if median("guarded_in_process", c):
            ratios["in_process_vs_batched_generate"] = median("guarded_in_process", c)["tokens_per_s"] \
                / base["tokens_per_s"]
        results["ratios"][str(c)] = {k: round(v, 3) for k, v in ratios.items()}
        targets.append(C.check_target(f"guarded chat via vLLM vs vLLM alone, {c} clients, tokens/s ratio",
                                      ratios["guarded_vllm_vs_vllm"], 0.9))
        if "in_process_vs_batched_generate" in ratios:
            targets.append(C.check_target(f"in-process server vs batched generate, {c} clients, tokens/s ratio",
                                          ratios["in_process_vs_batched_generate"], 0.8))
    C.print_table(f"guarded chat: demo model (cpu), greedy, at most {args.max_tokens} new tokens",
                  ["contender", "tokens/s", "p50 s", "p99 s", "p50 TTFT s", "vs batched generate"], table)
    C.print_targets(targets)
    payload = C.write_results(args.out, benchmark=NAME, settings=settings, model={"name": SERVED},
                              results=results, targets=targets,
                              extra={"workload": {"clients": clients, "max_tokens": args.max_tokens,
                                                  "prompts": len(prompts), "repeats": args.repeats,
                                                  "guard": str(GUARD.relative_to(ROOT)),
                                                  "guard_threads": args.guard_threads or "all cores"}})
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
