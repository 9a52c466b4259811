"""Prompt preparation: the library's ``ChatFormatter.encode`` vs a plain batched tokenizer call.

* ``library``: ``ChatFormatter.encode`` - one batched ``apply_chat_template`` call, each rendering
  checked against the cached template affixes, one tokenizer call with character offsets, the
  positions (t_inst, t_post_inst, ...) found, and padded tensors built.
* ``batched apply_chat_template + tokenizer``: what a user of plain transformers writes - one
  batched ``apply_chat_template(..., tokenize=False)`` and one ``tokenizer(texts, padding=True,
  return_tensors="pt")`` call; it finds no positions.
* ``per prompt``: the library's preparation called one prompt at a time (one template call and one
  tokenizer call per prompt), which is what collecting states did before it tokenised a whole
  prompt list in one call.

The same 2,000 Alpaca prompts (``rd_splits_harmless_train.json``) for all three; the token ids
of the library and of the plain call must be equal or the run fails.

    python benchmarks/bench_preparation.py            # demo model's tokenizer (Qwen2.5), 2,000 prompts
    python benchmarks/bench_preparation.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from pyvene_harm.positions import ChatFormatter  # noqa: E402

NAME = "preparation"


def load_tokenizer(name: str):
    """The demo model's own tokenizer (no weights loaded), or the in-memory benchmark tokenizer."""
    if name in C.REAL_MODELS:
        from transformers import AutoTokenizer

        from pyvene_harm.builtin_models import builtin_spec, prepare_demo

        return AutoTokenizer.from_pretrained(prepare_demo(spec=builtin_spec(name)))
    return C.bench_tokenizer(C.FULL_SIZE[name][1])


def plain_batched(tokenizer, prompts: Sequence[str]):
    """One batched template call and one tokenizer call, padded tensors (no positions)."""
    texts = tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], tokenize=False,
                                          add_generation_prompt=True)
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")


def per_prompt(formatter: ChatFormatter, prompts: Sequence[str]) -> list[Any]:
    """Render and tokenise one prompt at a time (a template call and a tokenizer call each)."""
    return [formatter.tokenize([p])[0] for p in prompts]


def same_tokens(batch, plain) -> bool:
    """Every prompt's unpadded token ids agree between the library and the plain call."""
    for i in range(len(batch)):
        mine = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        theirs = plain["input_ids"][i][plain["attention_mask"][i].bool()].tolist()
        if mine != theirs:
            return False
    return True


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, name=NAME)
    parser.add_argument("--n", type=int, default=None, help="prompts (default 2000; 200 with --quick)")
    args = parser.parse_args(argv)
    s = C.resolve_settings(args, repeats=5)
    s = dataclasses.replace(s, model=args.model or ("tiny" if s.quick else "demo"))
    n = args.n or (200 if s.quick else 2000)
    tokenizer = load_tokenizer(s.model)
    formatter = ChatFormatter(tokenizer)
    prompts = list(C.alpaca_prompts()[:n])
    if len(prompts) < n:  # the shared data is missing: cycle the fallback prompts
        prompts = [prompts[i % len(prompts)] for i in range(n)]

    out: dict[str, Any] = {}
    timings = C.time_interleaved(
        {"library": (lambda: out.__setitem__("library", formatter.encode(prompts)), n),
         "plain": (lambda: out.__setitem__("plain", plain_batched(tokenizer, prompts)), n),
         "per_prompt": (lambda: per_prompt(formatter, prompts), n)},
        repeats=s.repeats, device=s.device)
    equal = same_tokens(out["library"], out["plain"])
    lib, plain, single = timings["library"], timings["plain"], timings["per_prompt"]
    rows = [
        ["library: ChatFormatter.encode (positions + padded tensors)", lib.per_second, lib.median, 1.0],
        ["batched apply_chat_template + one tokenizer call (no positions)", plain.per_second, plain.median,
         lib.per_second / plain.per_second],
        ["per prompt: render + tokenise one at a time", single.per_second, single.median,
         lib.per_second / single.per_second],
    ]
    C.print_table(f"prompt preparation: {n} Alpaca prompts, {s.model} tokenizer",
                  ["path", "prompts/s", "median s", "library is x faster"], rows)
    results = {
        "library": lib.to_dict(), "plain_batched": plain.to_dict(), "per_prompt": single.to_dict(),
        "library_vs_plain": round(lib.per_second / plain.per_second, 3),
        "library_vs_per_prompt": round(lib.per_second / single.per_second, 3),
        "same_token_ids": equal,
        "tokens_per_prompt_mean": float(out["library"].attention_mask.sum()) / n,
    }
    targets = [
        C.check_target("library preparation vs batched template + tokenizer call, prompts/s ratio",
                       results["library_vs_plain"], 1.0),
        C.check_target("token ids equal: library vs plain batched call", float(equal), 1.0),
    ]
    C.print_targets(targets)
    payload = C.write_results(args.out, benchmark=NAME, settings=s, model={"tokenizer": s.model}, results=results,
                              targets=targets, extra={"workload": {"prompts": n, "source": "Alpaca "
                                                                   "rd_splits_harmless_train.json"}})
    print(f"wrote {args.out}")
    if not equal:
        raise SystemExit("the library and the plain batched call tokenised the prompts differently")
    return payload


if __name__ == "__main__":
    main()
