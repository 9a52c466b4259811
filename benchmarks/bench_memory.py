"""Peak memory: extraction at N and 10N prompts, and guard scoring vs a full forward.

Each measurement runs in a fresh Python process (``_common.measure_peak_memory``): the model
is loaded (every weight read once, so memory-mapped weights are resident) and the inputs built
first, then the peak is reset and the measured call runs. On
CPU the peak is the RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``);
on CUDA ``torch.cuda.max_memory_allocated``. Reported: the peak above what was held before the
call (weights and inputs excluded) - the number that grows if a pipeline keeps states per
prompt - and the total peak.

* extraction: ``collect_stats`` (both positions, all L+1 states) over N and 10N short prompts;
  its peak should not grow with the number of prompts (target: within 10%).
* guard: ``LatentGuard.decision_function`` (states 0..2L/3) vs the same batches through a full
  forward with ``output_hidden_states=True`` (which also materialises the logits).
* guard copy (``--guard-copy``, the demo model and its shipped guard): the peak of *starting* a
  scoring-only copy, as ``serve --upstream`` does: the model loaded with only the layers the
  guard reads (``load_model(keep_layers=...)``), vs the whole model loaded and the unread layers
  dropped after. Measured from the first byte loaded to the first prompt scored, in float32 (the
  file's dtype: weights stay memory-mapped) and bfloat16 (every weight is converted on load).

    python benchmarks/bench_memory.py            # CPU: demo model, N = 100 (10N = 1,000)
    python benchmarks/bench_memory.py --n 200    # issue 3's 200 vs 2,000 (about 7 min on 2 cores)
    python benchmarks/bench_memory.py --quick
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from pyvene_harm.positions import ChatFormatter  # noqa: E402

NAME = "memory"
SHORT_PROMPT_CHARS = 60


def _setup(model: str, device: str, dtype: str) -> tuple[C.BenchModel, ChatFormatter]:
    bm = C.load_bench_model(model, device=device, dtype=C.DTYPES[dtype])
    # safetensors weights are memory-mapped and count in the RSS only once read: read them all
    # now, so that the baseline holds the whole model and the peak measures the work alone
    with torch.no_grad():
        for p in bm.model.parameters():
            p.sum()
    return bm, ChatFormatter(bm.tokenizer)


# ----------------------------------------------------------------------------- child jobs


def extraction_job(*, model: str, device: str, dtype: str, n: int, batch_size: int) -> Callable[[], Any]:
    """collect_stats over ``n`` short prompts (run in a child process)."""
    from pyvene_harm.collect import collect_stats

    bm, formatter = _setup(model, device, dtype)
    prompts, labels = C.bench_prompts(n, max_chars=SHORT_PROMPT_CHARS)

    def run() -> dict[str, Any]:
        stats = collect_stats(bm.model, formatter, prompts, labels, batch_size=batch_size)
        return {"counts": stats.counts, "n_states": stats.n_states}

    return run


def guard_job(*, model: str, device: str, dtype: str, n: int, batch_size: int,
              depth: float) -> Callable[[], Any]:
    """LatentGuard.decision_function over ``n`` prompts (fitted during setup)."""
    import bench_guard as G

    bm, formatter = _setup(model, device, dtype)
    layers = G.guard_layers(bm.n_layers, depth)
    train, train_labels = C.bench_prompts(16, seed=1)
    guard = G.build_latent_guard(bm.model, bm.tokenizer, formatter, layers=layers, batch_size=batch_size,
                                 train_prompts=train, train_y=[int(g == "harmful") for g in train_labels])
    prompts, _ = C.bench_prompts(n)

    def run() -> dict[str, Any]:
        scores = guard.decision_function(prompts)
        return {"n_scores": len(scores)}

    return run


def full_forward_job(*, model: str, device: str, dtype: str, n: int, batch_size: int,
                     depth: float) -> Callable[[], Any]:
    """The same batches through the whole causal LM with ``output_hidden_states=True``."""
    import bench_guard as G

    bm, formatter = _setup(model, device, dtype)
    layers = G.guard_layers(bm.n_layers, depth)
    hidden = bm.model.config.hidden_size
    n_states = bm.n_layers + 1
    # the score's cost is negligible; random centroids keep the setup free of a second forward
    gen = torch.Generator().manual_seed(0)
    harmful, harmless = torch.randn(n_states, hidden, generator=gen), torch.randn(n_states, hidden, generator=gen)
    prompts, _ = C.bench_prompts(n)

    def run() -> dict[str, Any]:
        scores = G.full_forward_scores(bm.model, formatter, prompts, harmful=harmful, harmless=harmless,
                                       layers=layers, batch_size=batch_size)
        return {"n_scores": len(scores)}

    return run


def guard_copy_job(*, device: str, dtype: str, keep: bool, **_: Any) -> Callable[[], Any]:
    """Load the demo model for its shipped guard, cut to the layers it reads, and score once."""
    import gc

    from pyvene_harm.decoder_depth import drop_unread_layers, layers_to_run
    from pyvene_harm.guard import LatentGuard
    from pyvene_harm.models import load_model
    from pyvene_harm.pyvene_support import decoder_layers

    guard = LatentGuard.load(C.ROOT / "artifacts" / "qwen2.5-coder-0.5b-instruct" / "guard")
    full = int(guard.metadata_["num_layers"])
    needed = layers_to_run(full, guard.states_)

    def run() -> dict[str, Any]:
        loaded = load_model("demo", dtype=dtype, device=device, keep_layers=needed if keep else None)
        built = len(decoder_layers(loaded.model))
        loaded_bytes = _parameter_bytes(loaded.model)
        if not keep:
            drop_unread_layers(loaded.model, guard.states_)
            gc.collect()
        guard.set_params(model=loaded.model, tokenizer=loaded.tokenizer, progress=False)
        score = float(guard.decision_function(["How do I bake bread?"])[0])
        return {"layers_built": built, "layers_read": needed, "score": score, "parameter_bytes_built": loaded_bytes,
                "parameter_bytes_kept": _parameter_bytes(loaded.model)}

    return run


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def guard_copy(common: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Both ways of starting a scoring-only copy, in float32 and bfloat16, one process each."""
    script = Path(__file__)
    runs, targets = {}, []
    for dtype in ("float32", "bfloat16"):
        pair = {}
        for keep in (False, True):
            label = f"guard copy, {dtype}, {'keep_layers at load' if keep else 'whole model, then dropped'}"
            print(f"measuring {label} ...", flush=True)
            pair[keep] = runs[label] = C.measure_peak_memory(script, "guard_copy_job",
                                                             {**common, "dtype": dtype, "keep": keep})
        ratio = pair[True]["peak_above_baseline_bytes"] / max(1, pair[False]["peak_above_baseline_bytes"])
        gap = abs(pair[True]["result"]["score"] - pair[False]["result"]["score"])
        targets.append(C.check_target(f"guard copy start peak, keep_layers / load-then-drop ({dtype})",
                                      round(ratio, 3), 1.0, "<=",
                                      note=f"{pair[True]['result']['layers_read']} of "
                                           f"{pair[False]['result']['layers_built']} layers read"))
        targets.append(C.check_target(f"guard copy score, |keep_layers - load-then-drop| ({dtype})",
                                      gap, 1e-4, "<=", note="the same copy either way"))
    return runs, targets


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, name=NAME)
    parser.add_argument("--n", type=int, default=None,
                        help="N: extraction runs over N and 10N prompts (default 100, quick 4)")
    parser.add_argument("--n-guard", type=int, default=None, help="prompts scored (default 64, quick 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 CPU, 64 CUDA, quick 4")
    parser.add_argument("--depth", type=float, default=2 / 3)
    parser.add_argument("--workers", type=int, default=None,
                        help="measuring processes at a time on CPU (default 2 with --quick, else 1: "
                             "each holds a copy of the model)")
    parser.add_argument("--guard-copy", action="store_true",
                        help="measure only the start of a scoring-only guard copy (demo model, shipped guard)")
    args = parser.parse_args(argv)
    s = C.resolve_settings(args, repeats=1)
    n = args.n or (4 if s.quick else 100)
    n_guard = args.n_guard or (8 if s.quick else 64)
    batch_size = args.batch_size or (4 if s.quick else 64 if s.on_cuda else 16)
    common = {"model": s.model, "device": str(s.device), "dtype": str(s.dtype).removeprefix("torch."),
              "batch_size": batch_size}
    script = Path(__file__)
    if args.guard_copy:
        runs, targets = guard_copy({"device": str(s.device)})
        rows = [[k, C.mib(v["peak_above_baseline_bytes"]), v["result"]["layers_built"],
                 C.mib(v["result"]["parameter_bytes_built"]), C.mib(v["result"]["parameter_bytes_kept"])]
                for k, v in runs.items()]
        C.print_table(f"starting a guard copy: demo model ({s.device}, {next(iter(runs.values()))['kind']})",
                      ["start", "peak MiB", "layers built", "parameters built MiB", "parameters kept MiB"], rows)
        C.print_targets(targets)
        results = {"runs": {k: {**v, "peak_mib": round(C.mib(v["peak_above_baseline_bytes"]), 1)}
                            for k, v in runs.items()}}
        out = args.out if args.out.name != f"{NAME}.json" else args.out.with_name(f"{NAME}_guard_copy.json")
        payload = C.write_results(out, benchmark=NAME + "_guard_copy", settings=s, model={"name": "demo"},
                                  results=results, targets=targets)
        print(f"wrote {out}")
        return payload

    jobs = [
        (f"extraction, N={n}", "extraction_job", {"n": n}),
        (f"extraction, 10N={10 * n}", "extraction_job", {"n": 10 * n}),
        (f"LatentGuard, {n_guard} prompts", "guard_job", {"n": n_guard, "depth": args.depth}),
        (f"full forward, {n_guard} prompts", "full_forward_job", {"n": n_guard, "depth": args.depth}),
    ]
    # one fresh process per job, each measuring only itself, so they may overlap on a CPU;
    # a single GPU is shared, so there one at a time
    workers = 1 if s.on_cuda else (args.workers or (2 if s.quick else 1))
    print(f"measuring {len(jobs)} jobs, {workers} at a time ...", flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {label: pool.submit(C.measure_peak_memory, script, fn, {**common, **kwargs})
                   for label, fn, kwargs in jobs}
        runs: dict[str, dict[str, Any]] = {label: f.result() for label, f in futures.items()}

    labels = list(runs)
    ext_n, ext_10n, guard, full = (runs[k] for k in labels)
    growth = ext_10n["peak_above_baseline_bytes"] / max(1, ext_n["peak_above_baseline_bytes"]) - 1
    growth_total = ext_10n["peak_bytes"] / max(1, ext_n["peak_bytes"]) - 1
    guard_ratio = full["peak_above_baseline_bytes"] / max(1, guard["peak_above_baseline_bytes"])
    rows = [[k, C.mib(v["peak_above_baseline_bytes"]), C.mib(v["peak_bytes"]), C.mib(v["baseline_bytes"])]
            for k, v in runs.items()]
    C.print_table(f"peak memory: {s.model} ({s.device}), batch {batch_size} ({ext_n['kind']})",
                  ["job", "peak above baseline MiB", "peak total MiB", "baseline MiB"], rows)
    print(f"extraction 10N vs N: {growth:+.1%} above baseline, {growth_total:+.1%} in total; "
          f"full forward uses {guard_ratio:.2f}x the guard's extra memory")
    results = {
        "runs": {k: {**v, "peak_above_baseline_mib": round(C.mib(v["peak_above_baseline_bytes"]), 2),
                     "peak_mib": round(C.mib(v["peak_bytes"]), 2)} for k, v in runs.items()},
        "extraction_growth_10n_vs_n": growth,
        "extraction_growth_10n_vs_n_total": growth_total,
        "full_forward_vs_guard_peak_above_baseline": guard_ratio,
        "measurement": ext_n["kind"],
    }
    targets = [
        C.check_target("extraction peak (above baseline), 10N vs N growth", round(growth, 4), 0.10, "<=",
                       note="issue 3: flat within 10%"),
        C.check_target("extraction peak (total), 10N vs N growth", round(growth_total, 4), 0.10, "<="),
        C.check_target("guard peak below full forward's (ratio)", round(guard_ratio, 3), 1.0, ">=",
                       note="no number in the issue: reported, must not be worse"),
    ]
    C.print_targets(targets)
    payload = C.write_results(args.out, benchmark=NAME, settings=s, model={"name": s.model},
                              results=results, targets=targets, extra={"workload": {
                                  "n": n, "n_guard": n_guard, "batch_size": batch_size, "depth": args.depth,
                                  "extraction_prompt_max_chars": SHORT_PROMPT_CHARS}})
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
