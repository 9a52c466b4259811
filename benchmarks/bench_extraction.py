"""Extraction throughput: the library's batched collection vs the paper's released code path.

Three ways to get the same per-group means of the L+1 residual-stream states at t_inst and
t_post_inst, on the same prompts and the same model:

* ``pyvene_harm.collect_stats``: length-sorted batches, one pyvene forward per batch on the
  bare decoder (no LM head), float64 running sums.
* ``paper release``: a re-implementation, in this file, of ``src/extract_hidden.py`` of the
  paper's release (``get_mean_activations`` with its defaults): batch size 1, a full causal-LM
  forward with the LM head, no ``torch.no_grad()``, a forward pre-hook on every decoder layer
  (plus a forward hook on the last one) that casts the layer input to half precision, keeps the
  post-instruction positions and the ``NUM_TOKEN_HIDDEN = 2`` positions before them, and copies
  them to the CPU per prompt; means of the stacked states at the end. Two of its defects are
  not reproduced because they do not change the cost: positions come from the library's
  ChatFormatter (not from a suffix tokenised alone), and the per-hook ``print`` is left out.
* ``HF output_hidden_states``: the same batches through the full causal LM with
  ``output_hidden_states=True`` (a plain-transformers reference, LM head included).

The means of the three are compared: a fast path that is wrong fails the run (exit code 1).

    python benchmarks/bench_extraction.py            # CPU: the demo model, 64 prompts
    python benchmarks/bench_extraction.py --quick    # seconds: tiny random model
    python benchmarks/bench_extraction.py --device cuda --model llama3-8b --n 512
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from pyvene_harm.collect import collect_stats  # noqa: E402
from pyvene_harm.positions import ChatFormatter  # noqa: E402
from pyvene_harm.pyvene_support import decoder_layers  # noqa: E402

NAME = "extraction"
NUM_TOKEN_HIDDEN = 2  # the release keeps this many tokens before the post-instruction tokens
POSITIONS = ("t_inst", "t_post_inst")

Means = dict[tuple[str, str], torch.Tensor]  # (group, position) -> [n_states, hidden] float64


# ----------------------------------------------------------------------------- the release's path


@contextlib.contextmanager
def _add_hooks(pre_hooks: Sequence[tuple[torch.nn.Module, Callable]],
               fwd_hooks: Sequence[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    handles = []
    try:
        for module, hook in pre_hooks:
            handles.append(module.register_forward_pre_hook(hook))
        for module, hook in fwd_hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _keep_last(activation: torch.Tensor, n_post: int) -> torch.Tensor:
    """The release's slicing: the NUM_TOKEN_HIDDEN tokens before the suffix, then the suffix."""
    positions = list(range(-n_post, 0))
    context = activation[:, -len(positions) - NUM_TOKEN_HIDDEN:-len(positions), :]
    pos_activations = activation[:, positions, :]
    return torch.cat([context, pos_activations], dim=1)


def _pre_hook(layer: int, cache: list[list[torch.Tensor]], n_post: int) -> Callable:
    def hook_fn(module, inputs):
        activation = inputs[0].half()
        cache[layer].append(_keep_last(activation, n_post).clone().detach().cpu())
    return hook_fn


def _fwd_hook(cache: list[list[torch.Tensor]], n_post: int) -> Callable:
    def hook_fn(module, inputs, output):
        activation = (output[0] if isinstance(output, tuple) else output).half()
        cache[-1].append(_keep_last(activation, n_post).clone().detach().cpu())
    return hook_fn


def paper_path(model: torch.nn.Module, formatter: ChatFormatter, prompts: Sequence[str],
               labels: Sequence[str], *, no_grad: bool = False) -> Means:
    """Batch size 1, hooks on every layer, half-precision states copied to the CPU per prompt."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    device = next(model.parameters()).device
    means: Means = {}
    grad = torch.no_grad() if no_grad else contextlib.nullcontext()
    for group in dict.fromkeys(labels):  # the release runs harmful, then harmless
        cache: list[list[torch.Tensor]] = [[] for _ in range(n_layers + 1)]
        for prompt, label in zip(prompts, labels):
            if label != group:
                continue
            batch = formatter.encode([prompt])
            n_post = int(batch.t_post_inst[0] - batch.t_inst[0])
            pre = [(layers[i], _pre_hook(i, cache, n_post)) for i in range(n_layers)]
            fwd = [(layers[n_layers - 1], _fwd_hook(cache, n_post))]
            with _add_hooks(pre, fwd), grad:
                model(input_ids=batch.input_ids.to(device),
                      attention_mask=batch.attention_mask.to(device))
        # [n_states, n_prompts, kept positions, hidden]; the release averaged in half precision,
        # we average in float32 so that the comparison below measures the path, not the mean
        result = torch.stack([torch.cat(inner) for inner in cache]).float()
        mean = result.mean(dim=1).double()
        means[(group, "t_inst")] = mean[:, NUM_TOKEN_HIDDEN - 1]
        means[(group, "t_post_inst")] = mean[:, -1]
    return means


# ----------------------------------------------------------------------------- the library's path


def library_path(model: torch.nn.Module, formatter: ChatFormatter, prompts: Sequence[str],
                 labels: Sequence[str], *, batch_size: int) -> Means:
    stats = collect_stats(model, formatter, prompts, list(labels), batch_size=batch_size)
    return {(g, p): stats.mean(g, p) for g in stats.groups for p in POSITIONS}


# ----------------------------------------------------------------------------- plain transformers


def hf_path(model: torch.nn.Module, formatter: ChatFormatter, prompts: Sequence[str],
            labels: Sequence[str], *, batch_size: int) -> Means:
    """Full causal LM, ``output_hidden_states=True``, the library's batching.

    transformers' last hidden state is taken after the final norm, so only states 0..L-1
    (the layer inputs) match the library's; the last one is left out of the comparison.
    """
    sums: dict[tuple[str, str], torch.Tensor] = {}
    counts: dict[str, int] = {}
    for idx, batch, out in C.hidden_state_batches(model, formatter, prompts, batch_size=batch_size):
        rows = torch.arange(len(idx), device=out.hidden_states[0].device)
        for pos in POSITIONS:
            at = getattr(batch, pos).to(rows.device)
            states = torch.stack([h[rows, at] for h in out.hidden_states], dim=1).double()
            for j, i in enumerate(idx):
                key = (labels[i], pos)
                sums[key] = sums[key] + states[j].cpu() if key in sums else states[j].cpu()
        for i in idx:
            counts[labels[i]] = counts.get(labels[i], 0) + 1
    return {(g, p): s / counts[g] for (g, p), s in sums.items()}


# ----------------------------------------------------------------------------- comparison


def max_relative_difference(a: Means, b: Means, *, n_states: int | None = None) -> float:
    """Largest ``||a - b|| / ||b||`` over groups, positions and states (``b`` the reference)."""
    if set(a) != set(b):
        raise AssertionError(f"different groups/positions: {sorted(a)} vs {sorted(b)}")
    worst = 0.0
    for key in b:
        x, y = a[key][:n_states].double().cpu(), b[key][:n_states].double().cpu()
        if x.shape != y.shape:
            raise AssertionError(f"{key}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
        rel = (x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)
        worst = max(worst, float(rel.max()))
    return worst


def tolerance(dtype: torch.dtype) -> float:
    # the release stores half-precision states (about 5e-4 relative per element); batched
    # bf16 forwards round differently from unbatched ones through every layer
    return 1e-2 if dtype == torch.float32 else 6e-2


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, name=NAME)
    parser.add_argument("--n", type=int, default=None,
                        help="prompts, half AdvBench half Alpaca (default 64 on CPU, 512 on CUDA, 8 quick)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="library batch size (default 16 on CPU, 64 on CUDA)")
    parser.add_argument("--paper-no-grad", action="store_true",
                        help="run the release's path under torch.no_grad() (it had none)")
    args = parser.parse_args(argv)
    s = C.resolve_settings(args)
    n = args.n or (8 if s.quick else 512 if s.on_cuda else 64)
    batch_size = args.batch_size or (4 if s.quick else 64 if s.on_cuda else 16)

    bm = C.load_bench_model(s.model, device=s.device, dtype=s.dtype)
    formatter = ChatFormatter(bm.tokenizer)
    prompts, labels = C.bench_prompts(n)
    warm_p, warm_l = prompts[:2], labels[:2]
    tokens = [formatter.encode([p]).seq_len for p in prompts]

    paper = functools.partial(paper_path, bm.model, formatter, no_grad=args.paper_no_grad)
    library = functools.partial(library_path, bm.model, formatter, batch_size=batch_size)
    hf = functools.partial(hf_path, bm.model, formatter, batch_size=batch_size)

    means: dict[str, Means] = {}

    def timed(name: str, fn):
        def call() -> None:
            means[name] = fn(prompts, labels)
        return call

    paths = {"library": library, "paper_release": paper, "hf_hidden_states": hf}
    timings = C.time_interleaved({name: (timed(name, fn), n) for name, fn in paths.items()},
                                 repeats=s.repeats, device=s.device,
                                 warmups={name: (lambda fn=fn: fn(warm_p, warm_l)) for name, fn in paths.items()})
    runs = {name: (timings[name], means[name]) for name in paths}

    n_layers = bm.n_layers
    diff_paper = max_relative_difference(runs["library"][1], runs["paper_release"][1])
    diff_hf = max_relative_difference(runs["library"][1], runs["hf_hidden_states"][1], n_states=n_layers)
    tol = tolerance(s.dtype)
    paper_rate = runs["paper_release"][0].per_second

    labels_of = {"library": f"pyvene_harm collect_stats (batch {batch_size}, no LM head)",
                 "paper_release": "paper release path (batch 1, hooks, LM head)",
                 "hf_hidden_states": f"HF output_hidden_states=True (batch {batch_size})"}
    rows, results = [], {}
    for name, (timing, _) in runs.items():
        speedup = timing.per_second / paper_rate
        rows.append([labels_of[name], timing.per_second, timing.median, speedup])
        results[name] = {**timing.to_dict(), "prompts_per_s": round(timing.per_second, 4),
                         "speedup_vs_paper": round(speedup, 3), "description": labels_of[name]}
    results["library_vs_paper"] = round(runs["library"][0].per_second / paper_rate, 3)
    results["library_vs_hf"] = round(runs["library"][0].per_second / runs["hf_hidden_states"][0].per_second, 3)
    results["max_relative_difference"] = {
        "library_vs_paper_all_states": diff_paper,
        "library_vs_hf_layer_inputs": diff_hf,
        "tolerance": tol,
        "definition": "max over groups, positions and states of ||a - b|| / ||b||",
    }
    results["tokens_per_prompt"] = {"mean": sum(tokens) / len(tokens), "min": min(tokens), "max": max(tokens)}

    C.print_table(f"extraction: {n} prompts, {bm.name} ({s.device}, {s.to_dict()['dtype']})",
                  ["path", "prompts/s", "median s", "x paper"], rows)
    print(f"max relative difference of the means: library vs paper {diff_paper:.2e}, "
          f"library vs HF (layer inputs) {diff_hf:.2e} (tolerance {tol:g})")
    goal = 15.0 if s.on_cuda else 5.0
    goal_note = ("GPU target, Llama-3-8B-sized model" if s.on_cuda else "CPU target, demo model")
    if s.model not in (("llama3-8b", "qwen2-7b", "llama2-7b") if s.on_cuda else ("demo",)):
        goal_note += f" (this run: {s.model}, so indicative only)"
    targets = [
        C.check_target("library vs paper release, prompts/s ratio", results["library_vs_paper"], goal,
                       note=goal_note),
        C.check_target("means equal: library vs paper (max rel. diff)", diff_paper, tol, "<="),
        C.check_target("means equal: library vs HF (max rel. diff)", diff_hf, tol, "<="),
    ]
    C.print_targets(targets)
    payload = C.write_results(
        args.out, benchmark=NAME, settings=s, model=bm.describe(), results=results, targets=targets,
        extra={"workload": {"prompts": n, "batch_size": batch_size, "positions": list(POSITIONS),
                            "states": n_layers + 1, "paper_no_grad": args.paper_no_grad}})
    print(f"wrote {args.out}")
    if diff_paper > tol or diff_hf > tol:
        raise SystemExit(f"the paths disagree (max relative difference {max(diff_paper, diff_hf):.3g} "
                         f"> {tol:g}): the timings above are of a wrong computation")
    return payload


if __name__ == "__main__":
    main()
