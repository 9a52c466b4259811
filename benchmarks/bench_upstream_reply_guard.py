"""The reply guard in front of vLLM: what reading the engine's reply tokens costs guarded chat.

One vLLM engine, two guard servers in front of it (``serve --upstream``), the same in all but
``--reply-guard``: the second reads every reply token the engine writes with its own copy of the
model (a second forward, one piece at a time per reply, on its worker thread) before relaying it.
Closed-loop clients ask prompts the prompt guard lets through and wait for whole streamed replies;
the two servers are driven in turns, so drift hits both alike. Reported: completion tokens/s of
each and their ratio (issue 28's decoding target: at most 5% slower), and checks that the replies
are the same text and that every token of every reply was read (``guard.reply.tokens_judged``
equals the engine's ``completion_tokens``, less the end of turn that ended a reply).

    python benchmarks/bench_upstream_reply_guard.py                       # CPU: demo model, 4 clients
    python benchmarks/bench_upstream_reply_guard.py --clients 1,4 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from bench_serve_chat import drive, prompts_let_through  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "upstream_reply_guard"
SERVED = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
SHIPPED = ROOT / "artifacts" / "qwen2.5-coder-0.5b-instruct"


def _replies(url: str, prompts: Sequence[str], max_tokens: int) -> list[dict[str, Any]]:
    """Each prompt's whole reply, not streamed: its text, token count and the reply guard's finding."""
    out = []
    with httpx.Client(base_url=url, timeout=3600) as client:
        for p in prompts:
            r = client.post("/v1/chat/completions", json={"model": SERVED, "max_tokens": max_tokens,
                                                          "messages": [{"role": "user", "content": p}]})
            r.raise_for_status()
            body = r.json()
            out.append({"text": body["choices"][0]["message"]["content"],
                        "finish_reason": body["choices"][0]["finish_reason"],
                        "completion_tokens": body["usage"]["completion_tokens"],
                        "reply": body["guard"].get("reply")})
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4", help="closed-loop client counts, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest reply (greedy)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each server (the median is kept)")
    parser.add_argument("--reply-guard", type=Path, default=SHIPPED / "reply-guard",
                        help="the `guard reply-fit` folder the second server loads")
    parser.add_argument("--guard-threads", type=int, default=1,
                        help="torch threads of each guard server (serve --threads; the engine keeps the rest)")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                        help="the interpreter of vLLM's own environment")
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
    guard = LatentGuard.from_pretrained(str(SHIPPED / "guard"), loaded.model, loaded.tokenizer)
    prompts = prompts_let_through(guard, max(clients))
    del loaded, guard
    body = lambda p: {"model": SERVED, "messages": [{"role": "user", "content": p}],  # noqa: E731
                      "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    common = ["-m", "demo", "--guard", str(SHIPPED / "guard"), "--log-level", "warning", "--max-queue", "4096",
              "--threads", str(args.guard_threads)]

    with tempfile.TemporaryDirectory(prefix="bench-upstream-reply-") as tmp:
        C.log("starting vLLM and two guard servers in front of it (without and with the reply guard)")
        with VllmProcess(args.vllm_python, prepare_demo(), served_name=SERVED) as engine, \
                ServerProcess([*common, "--upstream", engine.url], log=Path(tmp) / "plain.log") as plain, \
                ServerProcess([*common, "--upstream", engine.url, "--reply-guard", str(args.reply_guard)],
                              log=Path(tmp) / "reply.log") as reading:
            fronts = {"guarded_vllm": plain.url, "guarded_vllm_reply_guard": reading.url}
            for url in fronts.values():  # warm-up
                drive(url, "/v1/chat/completions", [body(p) for p in prompts[:2]], 2, chat=True)
            without, with_reads = _replies(plain.url, prompts, args.max_tokens), \
                _replies(reading.url, prompts, args.max_tokens)
            for c in clients:
                for _ in range(args.repeats):
                    for name, url in fronts.items():
                        result = drive(url, "/v1/chat/completions", [body(p) for p in prompts[:c]], c, chat=True)
                        runs.setdefault(name, {}).setdefault(str(c), []).append(result)
                        C.log(f"{name}, {c} clients: {result['tokens_per_s']:.2f} tokens/s")

    let_through = [(a, b) for a, b in zip(without, with_reads) if not b["reply"]["flagged"]]
    checks = {"same_replies": all(a["text"] == b["text"] for a, b in let_through),
              # every token but an end of turn that ended the reply (not read, as in-process)
              "every_token_read": all(b["reply"]["tokens_judged"] == b["completion_tokens"] - (b["finish_reason"] == "stop")
                                      for _, b in let_through),
              "replies_stopped": sum(b["reply"]["flagged"] for b in with_reads)}

    def median(name: str, c: int) -> dict[str, Any]:
        rows = sorted(runs[name][str(c)], key=lambda r: r["tokens_per_s"])
        return rows[len(rows) // 2]

    table, ratios, targets = [], {}, []
    for c in clients:
        a, b = median("guarded_vllm", c), median("guarded_vllm_reply_guard", c)
        slower = 1.0 - b["tokens_per_s"] / a["tokens_per_s"]
        ratios[str(c)] = round(slower, 4)
        table.append([f"{c} clients", a["tokens_per_s"], b["tokens_per_s"], f"{slower:+.1%}"])
        if checks["same_replies"] and checks["every_token_read"]:
            targets.append(C.check_target(f"guarded chat via vLLM with the reply guard, {c} clients, slower by",
                                          slower, 0.05, "<="))
    C.print_table(f"guarded chat via vLLM, demo model (cpu), at most {args.max_tokens} greedy tokens",
                  ["clients", "tokens/s without", "tokens/s with the reply guard", "slower by"], table)
    C.print_targets(targets)
    print(f"checks: {checks}")
    payload = C.write_results(args.out, benchmark=NAME, settings=settings, model={"name": SERVED},
                              results={"runs": runs, "slower_by": ratios, "checks": checks}, targets=targets,
                              extra={"workload": {"clients": clients, "max_tokens": args.max_tokens,
                                                  "prompts": len(prompts), "repeats": args.repeats,
                                                  "reply_guard": str(args.reply_guard),
                                                  "guard_threads": args.guard_threads}})
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
