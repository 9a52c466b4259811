"""Guard scoring: LatentGuard vs a full forward and vs a generative guard of the same size.

* ``LatentGuard.decision_function``: Delta_harmful at t_inst over states 0..2L/3, one
  partial prefill per batch (the decoder stops after the deepest layer it reads, no LM head).
* the same with the design shipped for the demo model (``--design``; a logistic read-out of
  the mean of the instruction's last 16 tokens over the middle states): the speed of today's
  guard beside the paper's. Its prefill also stops at its deepest state and at t_inst.
* ``full forward``: the same batches through the whole causal LM with
  ``output_hidden_states=True``, then the same score - what one gets without early exit.
* ``GenerativeGuard.classify``: the same model prompted in Llama Guard 3's format (its 14
  categories), greedy-decoding up to ``--decode-tokens`` tokens (stopping at the end of turn)
  and parsing ``safe``/``unsafe`` - the cost of a guard that generates.

The guard's and the full forward's scores are compared (same numbers or the run fails).
On CUDA it also reports the achieved TFLOP/s of guard scoring at batch 64 x 48 tokens
against the GPU's bf16 dense peak, counting 2 x (parameters of the decoder layers run) x
(tokens); embeddings, the LM head (not run) and attention-score FLOPs are not counted.

    python benchmarks/bench_guard.py             # CPU: demo model
    python benchmarks/bench_guard.py --quick
    python benchmarks/bench_guard.py --device cuda --model llama3-8b
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

from pyvene_harm.beliefs import belief_per_layer  # noqa: E402
from pyvene_harm.decoder_depth import layers_to_run  # noqa: E402
from pyvene_harm.guard import GenerativeGuard, LatentGuard  # noqa: E402
from pyvene_harm.guard.crossval import parse_design  # noqa: E402
from pyvene_harm.positions import ChatFormatter  # noqa: E402

NAME = "guard"
DEFAULT_DESIGN = "linear-last16-aug"
"""The design timed beside the paper's guard: the one shipped for the demo model."""

# PEAK dense bf16 TFLOP/s by GPU name (spec sheets, without sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
                    "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0,
                    "L4": 121.0}


def guard_layers(n_layers: int, fraction: float = 2 / 3) -> list[int]:
    """States 0..round(fraction * L): the guard reads nothing deeper."""
    return list(range(0, int(round(fraction * n_layers)) + 1))


# ----------------------------------------------------------------------------- the guards


def build_latent_guard(model, tokenizer, formatter: ChatFormatter, *, layers: Sequence[int],
                       batch_size: int, train_prompts: Sequence[str], train_y: Sequence[int]) -> LatentGuard:
    """The library's LatentGuard reading ``layers``, fitted on a few prompts (not timed)."""
    guard = LatentGuard(model, tokenizer, layers=list(layers), batch_size=batch_size, formatter=formatter)
    return guard.fit(list(train_prompts), list(train_y))


def guard_centroids(guard: LatentGuard, n_states: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The fitted guard's (harmful ``[n_states, d]``, harmless, layers), for the full-forward twin."""
    full = {}
    for k in ("harmful", "harmless"):
        c = torch.as_tensor(guard.centroids_[k], dtype=torch.float32)
        full[k] = torch.zeros(n_states, c.shape[-1])
        full[k][list(guard.states_)] = c
    return full["harmful"], full["harmless"], list(guard.layers_)


# ----------------------------------------------------------------------------- the full-forward twin


def full_forward_scores(model, formatter: ChatFormatter, prompts: Sequence[str], *, harmful: torch.Tensor,
                        harmless: torch.Tensor, layers: Sequence[int], batch_size: int) -> torch.Tensor:
    """Delta_harmful from a whole causal-LM forward with ``output_hidden_states=True``."""
    n_layers = model.config.num_hidden_layers
    if max(layers) >= n_layers:  # transformers' last hidden state is after the final norm
        raise ValueError("the full-forward twin reads layer inputs only (states < L)")
    scores = torch.empty(len(prompts), dtype=torch.float64)
    for idx, batch, out in C.hidden_state_batches(model, formatter, prompts, batch_size=batch_size):
        rows = torch.arange(len(idx), device=out.hidden_states[0].device)
        at = batch.t_inst.to(rows.device)
        states = torch.stack([out.hidden_states[lay][rows, at] for lay in layers], dim=1).float().cpu()
        scores[idx] = belief_per_layer(states, harmful[layers], harmless[layers]).mean(-1)
    return scores


def generative_verdicts(guard: GenerativeGuard, prompts: Sequence[str], out: dict[str, Any]) -> None:
    """``GenerativeGuard.classify`` (what ``predict`` runs), keeping the answers' lengths."""
    verdicts = guard.classify(list(prompts))
    out["answer_tokens"] = [len(guard.tokenizer(v.text, add_special_tokens=False)["input_ids"])
                             for v in verdicts]
    out["labels"] = [v.label for v in verdicts]


# ----------------------------------------------------------------------------- GPU efficiency


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value, f"spec sheet for {key} (matched {name!r})"
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


def layer_parameters(model, n_run: int) -> int:
    from pyvene_harm.pyvene_support import decoder_layers

    return sum(p.numel() for layer in list(decoder_layers(model))[:n_run] for p in layer.parameters())


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, name=NAME)
    parser.add_argument("--n", type=int, default=None, help="prompts scored (default 64 CPU, 512 CUDA)")
    parser.add_argument("--n-generative", type=int, default=None,
                        help="prompts for the generative guard (default 16 CPU, 128 CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 CPU, 64 CUDA")
    parser.add_argument("--decode-tokens", type=int, default=10,
                        help="GenerativeGuard max_new_tokens (it stops earlier at end of turn)")
    parser.add_argument("--depth", type=float, default=2 / 3, help="fraction of the layers the guard reads")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 dense peak (TFLOP/s)")
    parser.add_argument("--design", default=DEFAULT_DESIGN,
                        help="the guard design timed beside the paper's (a `guard crossval` preset or spec)")
    args = parser.parse_args(argv)
    s = C.resolve_settings(args)
    n = args.n or (8 if s.quick else 512 if s.on_cuda else 64)
    n_gen = args.n_generative or (4 if s.quick else 128 if s.on_cuda else 16)
    batch_size = args.batch_size or (4 if s.quick else 64 if s.on_cuda else 16)

    bm = C.load_bench_model(s.model, device=s.device, dtype=s.dtype)
    formatter = ChatFormatter(bm.tokenizer)
    layers = guard_layers(bm.n_layers, args.depth)
    train, train_labels = C.bench_prompts(8 if s.quick else 32, seed=1)
    train_y = [int(g == "harmful") for g in train_labels]
    guard = build_latent_guard(bm.model, bm.tokenizer, formatter, layers=layers, batch_size=batch_size,
                               train_prompts=train, train_y=train_y)
    harmful, harmless, layers = guard_centroids(guard, bm.n_layers + 1)
    design = parse_design(args.design, bm.n_layers + 1)
    designed = LatentGuard(bm.model, bm.tokenizer, method=design.method, reads=design.reads,
                           layers=list(design.layers) if design.layers else None, C=design.C or 1.0,
                           rank=design.rank, batch_size=batch_size, formatter=formatter)
    designed.fit(list(train), train_y)
    generative = GenerativeGuard(bm.model, bm.tokenizer, max_new_tokens=args.decode_tokens,
                                 batch_size=batch_size)
    prompts, _ = C.bench_prompts(n)
    gen_prompts = prompts[:n_gen]
    warm = prompts[:2]

    scores: dict[str, torch.Tensor] = {}

    def latent(ps=prompts):
        scores["latent"] = torch.as_tensor(guard.decision_function(list(ps)), dtype=torch.float64)

    def shipped(ps=prompts):
        designed.decision_function(list(ps))

    def full(ps=prompts):
        scores["full"] = full_forward_scores(bm.model, formatter, list(ps), harmful=harmful, harmless=harmless,
                                             layers=layers, batch_size=batch_size)

    answers: dict[str, Any] = {}
    timings = C.time_interleaved(
        {"latent": (latent, n), "design": (shipped, n), "full": (full, n),
         "generative": (lambda: generative_verdicts(generative, gen_prompts, answers), n_gen)},
        repeats=s.repeats, device=s.device,
        warmups={"latent": lambda: latent(warm), "design": lambda: shipped(warm), "full": lambda: full(warm),
                 "generative": lambda: generative_verdicts(generative, warm, {})})
    t_latent, t_full, t_gen = timings["latent"], timings["full"], timings["generative"]
    t_design = timings["design"]
    score_diff = float((scores["latent"] - scores["full"]).abs().max())
    score_tol = 1e-4 if s.dtype == torch.float32 else 2e-2

    rate = t_latent.per_second
    gen_tokens = [len(bm.tokenizer(generative.format_prompt(p), add_special_tokens=False)["input_ids"])
                  for p in gen_prompts]
    decoded = answers["answer_tokens"]
    tokens = [formatter.encode([p]).seq_len for p in prompts]
    n_run = layers_to_run(bm.n_layers, layers)
    rows = [
        [f"LatentGuard (states 0-{max(layers)}, {n_run}/{bm.n_layers} layers run)", rate, t_latent.median, 1.0],
        [f"LatentGuard, design {design.name} (states {min(designed.states_)}-{max(designed.states_)}, "
         f"reads {'+'.join(design.reads)})", t_design.per_second, t_design.median, rate / t_design.per_second],
        ["full forward, output_hidden_states=True", t_full.per_second, t_full.median, rate / t_full.per_second],
        [f"GenerativeGuard (Llama Guard 3 prompt, <= {args.decode_tokens} tokens)", t_gen.per_second,
         t_gen.median, rate / t_gen.per_second],
    ]
    C.print_table(f"guard scoring: {bm.name} ({s.device}), batch {batch_size}",
                  ["path", "prompts/s", "median s", "LatentGuard is x faster"], rows)
    print(f"max |LatentGuard - full-forward twin| of Delta_harmful: {score_diff:.2e} (tolerance {score_tol:g})")
    results: dict[str, Any] = {
        "latent_guard": {**t_latent.to_dict(), "layers": layers, "decoder_layers_run": n_run},
        "design_guard": {**t_design.to_dict(), "design": design.as_dict(), "states": list(designed.states_)},
        "design_vs_paper_guard": round(t_design.per_second / rate, 3),
        "design_vs_full_forward": round(t_design.per_second / t_full.per_second, 3),
        "full_forward": t_full.to_dict(),
        "generative_guard": {**t_gen.to_dict(), "max_new_tokens": args.decode_tokens,
                             "answer_tokens_mean": sum(decoded) / len(decoded),
                             "prompt_tokens_mean": sum(gen_tokens) / len(gen_tokens),
                             "verdicts": {k: answers["labels"].count(k) for k in sorted(set(answers["labels"]))}},
        "latent_vs_full_forward": round(rate / t_full.per_second, 3),
        "latent_vs_generative": round(rate / t_gen.per_second, 3),
        "max_abs_score_difference": score_diff,
        "score_tolerance": score_tol,
        "tokens_per_prompt_mean": sum(tokens) / len(tokens),
    }
    targets = [
        C.check_target("LatentGuard vs full forward, prompts/s ratio", results["latent_vs_full_forward"], 3.0),
        C.check_target("LatentGuard vs generative guard, prompts/s ratio", results["latent_vs_generative"], 15.0),
        C.check_target(f"design {design.name} vs full forward, prompts/s ratio", results["design_vs_full_forward"],
                       3.0),
        C.check_target("scores equal: LatentGuard vs full forward (max abs diff)", score_diff, score_tol, "<="),
    ]
    if s.on_cuda:
        results["gpu_efficiency"] = gpu_efficiency(bm, formatter, guard, layers, s, args.peak_tflops)
        eff = results["gpu_efficiency"]
        targets.append(C.check_target("guard scoring, fraction of bf16 peak", eff["fraction_of_peak"], 0.5,
                                      note=eff["flops_definition"]))
    else:
        results["gpu_efficiency"] = "not measured: needs CUDA"
    C.print_targets(targets)
    payload = C.write_results(args.out, benchmark=NAME, settings=s, model=bm.describe(), results=results,
                              targets=targets, extra={"workload": {
                                  "prompts": n, "generative_prompts": n_gen, "batch_size": batch_size,
                                  "depth": args.depth, "train_prompts": len(train)}})
    print(f"wrote {args.out}")
    if score_diff > score_tol:
        raise SystemExit(f"LatentGuard and its full-forward twin disagree by {score_diff:.3g}: "
                         "the timings above are of a wrong computation")
    return payload


def gpu_efficiency(bm: C.BenchModel, formatter: ChatFormatter, guard, layers: Sequence[int],
                   s: C.Settings, override: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s of ``decision_function`` on 64 prompts of 48 tokens."""
    batch, n_tokens = 64, 48
    prompts = C.prompts_of_length(formatter, batch, n_tokens)
    enc = formatter.encode(prompts, padding_side="left")
    # the guard runs the tokens up to t_inst only (nothing after it changes that state)
    real_tokens = int(enc.attention_mask[:, :int(enc.t_inst.max()) + 1].sum())
    if hasattr(guard, "batch_size"):
        guard.batch_size = batch
    n_run = layers_to_run(bm.n_layers, layers)
    params = layer_parameters(bm.model, n_run)
    timing = C.time_call(lambda: guard.decision_function(prompts), items=batch, repeats=max(5, s.repeats),
                         device=s.device, warmup_runs=2)
    flops = 2 * params * real_tokens
    achieved = flops / timing.median / 1e12
    peak, source = peak_tflops(s.device, override)
    return {
        "batch": batch, "tokens_per_prompt_asked": n_tokens, "padded_shape": list(enc.input_ids.shape),
        "real_tokens": real_tokens, "decoder_layers_run": n_run, "parameters_used": params,
        "flops": flops, "median_s": timing.median, "achieved_tflops": achieved,
        "peak_tflops": peak, "peak_source": source,
        "fraction_of_peak": (achieved / peak) if peak else None,
        "flops_definition": (f"2 x {params:,} parameters of the {n_run} decoder layers run x {real_tokens} "
                             "real tokens; embeddings, LM head (not run) and attention scores not counted; "
                             "time is the whole decision_function call (tokenising included)"),
        "timing": timing.to_dict(),
    }


if __name__ == "__main__":
    main()
