"""Steering overhead: steered greedy generation through pyvene vs plain ``model.generate``.

The steered run adds ``coeff * v`` to the residual stream entering one middle layer at every
prompt position and at every generated token (``positions="all_prompt", generated=True``),
through the library's ``pyvene_harm.interventions.steer``. The directions are random unit
vectors (a DirectionSet built from random centroids): the cost does not depend on them.
Every sequence decodes exactly ``--new-tokens`` tokens in both runs (``min_new_tokens``), so
tokens/s compare like with like.

Two checks keep the timing honest: with ``coeff=0`` the steered tokens equal the plain ones
(the hooks change nothing else), and with a large ``coeff`` they differ (steering is applied).

    python benchmarks/bench_steering.py          # CPU: demo model, batch 16, 128 new tokens
    python benchmarks/bench_steering.py --quick
    python benchmarks/bench_steering.py --device cuda --model llama3-8b
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from pyvene_harm.directions import DirectionSet  # noqa: E402
from pyvene_harm.interventions import Steering, steer  # noqa: E402
from pyvene_harm.positions import ChatFormatter  # noqa: E402

NAME = "steering"


def random_directions(n_states: int, hidden: int, *, seed: int = 0) -> DirectionSet:
    """A DirectionSet whose harmfulness and refusal directions are random unit vectors."""
    gen = torch.Generator().manual_seed(seed)
    unit = []
    for _ in range(2):
        v = torch.randn(n_states, hidden, generator=gen)
        unit.append(v / v.norm(dim=-1, keepdim=True))
    zeros = torch.zeros(n_states, hidden)
    return DirectionSet(centroids={"harmful": unit[0], "harmless": zeros, "refused": unit[1], "accepted": zeros},
                        metadata={"model_id": "random unit directions (benchmark)"})


def build_steering(model, directions: DirectionSet, *, layer: int, coeff: float) -> Steering:
    return steer(model, directions, direction="harmfulness", layer=layer, coeff=coeff,
                 positions="all_prompt", generated=True)


def greedy(tokenizer, model, new_tokens: int):
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            num_beams=1, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, name=NAME)
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per prompt (default 128)")
    parser.add_argument("--layer", type=int, default=None, help="steered layer (default: the middle one)")
    parser.add_argument("--coeff", type=float, default=4.0, help="steering coefficient on a unit vector")
    args = parser.parse_args(argv)
    s = C.resolve_settings(args)
    batch_size = args.batch_size or (4 if s.quick else 16)
    new_tokens = args.new_tokens or (8 if s.quick else 128)

    bm = C.load_bench_model(s.model, device=s.device, dtype=s.dtype)
    formatter = ChatFormatter(bm.tokenizer)
    layer = args.layer if args.layer is not None else bm.n_layers // 2
    directions = random_directions(bm.n_layers + 1, bm.model.config.hidden_size)
    prompts, _ = C.bench_prompts(batch_size)
    batch = formatter.encode(prompts, padding_side="left").to(s.device)
    config = greedy(bm.tokenizer, bm.model, new_tokens)
    short = greedy(bm.tokenizer, bm.model, min(8, new_tokens))

    steering = build_steering(bm.model, directions, layer=layer, coeff=args.coeff)

    def plain(cfg=config):
        with torch.inference_mode():
            return bm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     generation_config=cfg)

    last: dict[str, torch.Tensor] = {}

    def steered(cfg=config, st=steering):
        with torch.inference_mode():
            last["ids"] = st.generate_batch(batch, cfg)
        return last["ids"]

    # honesty checks on a few tokens: coeff 0 changes nothing, a large coeff changes the tokens
    zero = build_steering(bm.model, directions, layer=layer, coeff=0.0)
    strong = build_steering(bm.model, directions, layer=layer, coeff=1000.0)
    ref = plain(short)
    same_at_zero = bool(torch.equal(steered(short, zero).cpu(), ref.cpu()))
    differs_when_strong = not torch.equal(steered(short, strong).cpu(), ref.cpu())
    del zero, strong

    items = batch_size * new_tokens
    timings = C.time_interleaved({"plain": (plain, items), "steered": (steered, items)}, repeats=s.repeats,
                                 device=s.device, warmups={"plain": lambda: plain(short),
                                                           "steered": lambda: steered(short)})
    t_plain, t_steer = timings["plain"], timings["steered"]
    out_len = last["ids"].shape[1] - batch.seq_len  # of the last timed call
    slowdown = t_steer.median / t_plain.median - 1

    C.print_table(f"steering: {bm.name} ({s.device}), batch {batch_size} x {new_tokens} new tokens, layer {layer}",
                  ["generation", "tokens/s", "median s", "slower by"],
                  [["plain model.generate", t_plain.per_second, t_plain.median, "-"],
                   [f"steered through pyvene (layer {layer}, all positions)", t_steer.per_second, t_steer.median,
                    f"{slowdown:+.1%}"]])
    print(f"checks: coeff=0 gives the plain tokens: {same_at_zero}; a large coeff changes them: "
          f"{differs_when_strong}; steered run decoded {out_len} tokens per prompt")
    limit = 0.10 if s.on_cuda else 0.15
    results: dict[str, Any] = {
        "plain": t_plain.to_dict(),
        "steered": t_steer.to_dict(),
        "slowdown": slowdown,
        "tokens_per_s": {"plain": t_plain.per_second, "steered": t_steer.per_second},
        "checks": {"coeff_zero_equals_plain": same_at_zero, "large_coeff_changes_tokens": differs_when_strong,
                   "decoded_tokens_per_prompt": out_len},
        "prompt_tokens": batch.seq_len,
    }
    targets = [
        C.check_target("steered generation slowdown vs plain", round(slowdown, 4), limit, "<=",
                       note="GPU: 10%, CPU: 15%"),
        C.check_target("coeff=0 steering reproduces plain tokens", float(same_at_zero), 1.0, ">="),
        C.check_target("large coeff changes the tokens (steering applied)", float(differs_when_strong), 1.0, ">="),
    ]
    C.print_targets(targets)
    payload = C.write_results(args.out, benchmark=NAME, settings=s, model=bm.describe(), results=results,
                              targets=targets, extra={"workload": {
                                  "batch_size": batch_size, "new_tokens": new_tokens, "layer": layer,
                                  "coeff": args.coeff, "positions": "all_prompt + every generated token"}})
    print(f"wrote {args.out}")
    if not (same_at_zero and differs_when_strong):
        raise SystemExit("the steered generation is wrong (see the checks above): its timing means nothing")
    return payload


if __name__ == "__main__":
    main()
