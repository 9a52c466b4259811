"""Decoding with the reply guard on vs off: what judging every reply token costs a server.

The reply guard reads each reply from the states the decoding forward computes anyway (hooks on
the layers it reads, :class:`pyvene_harm.serve.reply_watch.ReplyWatch`): per token, one copy of
``S x d`` numbers and a dot product. Both contenders are the server's own decoding calls
(``generate_reply`` for one reply, ``generate_reply_batch`` for a batch), greedy, on the same
prompts, timed in turns. The reply guard's read-out is fitted on random states (its cost does not
depend on its values) with an infinite threshold, so it never stops a reply and both sides write
the same tokens; ``--reply-guard DIR`` times a saved guard's own read-out (states, window) instead,
its threshold likewise set to infinity.

Checks (a wrong run exits 1): the guarded replies equal the plain ones, and the guard judged every
reply token but the last.

    python benchmarks/bench_reply_guard.py            # CPU: demo model, 1 reply and a batch of 8, 64 tokens
    python benchmarks/bench_reply_guard.py --quick
    python benchmarks/bench_reply_guard.py --reply-guard artifacts/qwen2.5-coder-0.5b-instruct/reply-guard
    python benchmarks/bench_reply_guard.py --device cuda --model llama3-8b
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from pyvene_harm.guard.reply import ReplyGuard  # noqa: E402
from pyvene_harm.positions import ChatFormatter  # noqa: E402
from pyvene_harm.serve.decoding import ReplyRequest, generate_reply, generate_reply_batch  # noqa: E402

NAME = "reply_guard"


def random_reply_guard(hidden: int, states: tuple[int, ...], *, seed: int = 0) -> ReplyGuard:
    """A fitted reply guard over ``states`` that never flags (threshold +inf)."""
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=(20, len(states), hidden)).astype(np.float32) for _ in range(16)]
    guard = ReplyGuard(states=states, width=32, min_tokens=8, C=1.0, rank=8).fit(x, [i % 2 for i in range(16)])
    guard.threshold_ = float("inf")
    return guard


def reply_prompts(n: int) -> list[str]:
    """``n`` short harmless (Alpaca) prompts: replies that run on, as a served reply does, not
    the one-line refusal a harmful prompt draws."""
    prompts, groups = C.bench_prompts(2 * n, max_chars=200)
    return [p for p, g in zip(prompts, groups, strict=True) if g == "harmless"]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, name=NAME)
    parser.add_argument("--batch-size", type=int, default=None, help="replies per batched call (default 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="most tokens per reply (default 64)")
    parser.add_argument("--reply-guard", type=Path, default=None,
                        help="a `guard reply-fit` folder whose read-out is timed (default: a random one at state 2L/3-4)")
    args = parser.parse_args(argv)
    s = C.resolve_settings(args)
    batch_size = args.batch_size or (2 if s.quick else 8)
    new_tokens = args.new_tokens or (12 if s.quick else 64)

    bm = C.load_bench_model(s.model, device=s.device, dtype=s.dtype)
    fmt = ChatFormatter(bm.tokenizer)
    if args.reply_guard is not None:
        guard = ReplyGuard.load(args.reply_guard)
        guard.threshold_ = float("inf")  # never stops a reply: both sides write the same tokens
        states, width = tuple(guard.states_), int(guard.width)
    else:
        states = (max(1, (2 * bm.n_layers) // 3 - 4),)  # the demo model's 12 of 24
        guard, width = random_reply_guard(bm.model.config.hidden_size, states), 32
    harmless = reply_prompts(batch_size)
    one = harmless[0]
    requests = [ReplyRequest(p, new_tokens) for p in harmless]
    got: dict[str, Any] = {}

    def single(rg=None, key="single"):
        got[key] = generate_reply(bm.model, fmt, one, max_new_tokens=new_tokens, reply_guard=rg)

    def batched(rg=None, key="batch"):
        got[key] = generate_reply_batch(bm.model, fmt, requests, reply_guard=rg)

    calls = {"1 reply, plain": (lambda: single(None, "single"), 1),
             "1 reply, reply guard": (lambda: single(guard, "single_guarded"), 1),
             f"batch {batch_size}, plain": (lambda: batched(None, "batch"), 1),
             f"batch {batch_size}, reply guard": (lambda: batched(guard, "batch_guarded"), 1)}
    timings = C.time_interleaved(calls, repeats=s.repeats, device=s.device)
    tokens = {"single": got["single"].completion_tokens, "batch": sum(r.completion_tokens for r in got["batch"])}
    same = (got["single"].text == got["single_guarded"].text
            and [r.text for r in got["batch"]] == [r.text for r in got["batch_guarded"]])
    judged = all(r.reply_guard["tokens_judged"] == r.completion_tokens - 1
                 for r in [got["single_guarded"], *got["batch_guarded"]])
    names = list(calls)
    slow_1 = timings[names[1]].median / timings[names[0]].median - 1
    slow_b = timings[names[3]].median / timings[names[2]].median - 1
    C.print_table(f"reply guard while decoding: {bm.name} ({s.device}), up to {new_tokens} tokens, states {states}, "
                  f"window {width}",
                  ["decoding", "tokens", "median s", "tokens/s", "slower by"],
                  [[names[0], tokens["single"], timings[names[0]].median, tokens["single"] / timings[names[0]].median,
                    "-"],
                   [names[1], tokens["single"], timings[names[1]].median, tokens["single"] / timings[names[1]].median,
                    f"{slow_1:+.1%}"],
                   [names[2], tokens["batch"], timings[names[2]].median, tokens["batch"] / timings[names[2]].median,
                    "-"],
                   [names[3], tokens["batch"], timings[names[3]].median, tokens["batch"] / timings[names[3]].median,
                    f"{slow_b:+.1%}"]])
    print(f"checks: guarded replies equal the plain ones: {same}; every reply token but the last judged: {judged}")
    results = {"timings": {n: t.to_dict() for n, t in timings.items()}, "tokens": tokens,
               "slowdown": {"single": slow_1, "batch": slow_b},
               "checks": {"same_replies": same, "every_token_but_last_judged": judged}}
    targets = [C.check_target("decoding slowdown with the reply guard, 1 reply", round(slow_1, 4), 0.05, "<="),
               C.check_target(f"decoding slowdown with the reply guard, batch {batch_size}", round(slow_b, 4), 0.05,
                              "<="),
               C.check_target("guarded replies equal plain ones", float(same), 1.0, ">=")]
    C.print_targets(targets)
    payload = C.write_results(args.out, benchmark=NAME, settings=s, model=bm.describe(), results=results,
                              targets=targets, extra={"workload": {"batch_size": batch_size, "new_tokens": new_tokens,
                                                                   "states": list(states), "width": width,
                                                                   "reply_guard": str(args.reply_guard or "random")}})
    print(f"wrote {args.out}")
    if not (same and judged):
        raise SystemExit("the guarded decoding is wrong (see the checks above): its timing means nothing")
    return payload


if __name__ == "__main__":
    main()
