"""Shared helpers for the benchmarks: settings, timing, peak memory, tables and JSON; the models
(``_bench_models.py``) and prompts (``_bench_prompts.py``) are re-exported from here.

Every benchmark script imports this module from its own folder (``benchmarks/`` is not a
package). It is also the entry point of the child processes that measure peak memory:
``python benchmarks/_common.py --child SCRIPT FUNCTION JSON`` imports ``FUNCTION`` from
``SCRIPT``, calls it with the JSON keyword arguments to set up (load the model, build the
inputs), then measures the peak memory of the callable it returns - in a fresh process, so
that nothing measured before can hide in the high-water mark.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

from _bench_models import (  # noqa: E402,F401
    FULL_SIZE,
    MODEL_CHOICES,
    REAL_MODELS,
    BenchModel,
    bench_tokenizer,
    load_bench_model,
)
from _bench_prompts import DATA_DIR, alpaca_prompts, bench_prompts, data_source, prompts_of_length  # noqa: E402,F401

from pyvene_harm.io_utils import atomic_write_json  # noqa: E402

__all__ = [
    "BenchModel",
    "Timing",
    "add_common_args",
    "bench_prompts",
    "check_target",
    "describe_hardware",
    "hidden_state_batches",
    "load_bench_model",
    "measure_peak_memory",
    "print_table",
    "prompts_of_length",
    "resolve_settings",
    "sync",
    "time_call",
    "time_interleaved",
    "versions",
    "write_results",
]

RESULTS_DIR = ROOT / "benchmarks" / "results"
CHILD_MARKER = "PYVENE_HARM_BENCH_CHILD "

def hidden_state_batches(model: torch.nn.Module, formatter: Any, prompts: Sequence[str], *,
                         batch_size: int):
    """The plain-transformers contender: yield ``(prompt indices, batch, output)`` of a whole
    causal-LM forward with ``output_hidden_states=True``, batched like the library (similar
    lengths together, left padding), so only the computation differs."""
    device = next(model.parameters()).device
    lengths = [len(formatter.tokenizer(formatter.render(p).text, add_special_tokens=False)["input_ids"])
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = formatter.encode([prompts[i] for i in idx], padding_side="left")
            out = model(**{k: v.to(device) for k, v in batch.model_inputs().items()},
                        output_hidden_states=True, use_cache=False)
            yield idx, batch, out


# ----------------------------------------------------------------------------- settings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_common_args(parser: argparse.ArgumentParser, *, name: str) -> None:
    """``--quick``, ``--device``, ``--model``, ``--dtype``, ``--repeats``, ``--out``."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny random model and a handful of prompts: a smoke test of seconds")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--model", choices=MODEL_CHOICES, default=None,
                        help="default: tiny with --quick, llama3-8b on CUDA, demo on CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help="where to write the JSON results")


@dataclass(frozen=True)
class Settings:
    quick: bool
    device: torch.device
    model: str
    dtype: torch.dtype
    repeats: int
    load_at_start: tuple[float, ...] = ()

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def to_dict(self) -> dict[str, Any]:
        return {"quick": self.quick, "device": str(self.device), "model": self.model,
                "dtype": str(self.dtype).removeprefix("torch."), "repeats": self.repeats,
                "load_average_at_start": list(self.load_at_start)}


def resolve_settings(args: argparse.Namespace, *, repeats: int = 3) -> Settings:
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device} needs CUDA, which is not available here: use cpu")
    model = args.model or ("tiny" if args.quick else "llama3-8b" if device.type == "cuda" else "demo")
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = args.repeats if args.repeats is not None else (1 if args.quick else repeats)
    if n < 1:
        raise SystemExit(f"--repeats must be at least 1, got {n}")
    try:
        load = tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        load = ()
    return Settings(quick=args.quick, device=device, model=model, dtype=dtype, repeats=n, load_at_start=load)


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (a no-op on CPU) so wall-clock times are real."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock seconds of each timed repeat (after warm-up)."""

    seconds: list[float]
    items: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_second(self) -> float:
        """Items (prompts, tokens) per second at the median time."""
        return self.items / self.median

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": [round(s, 6) for s in self.seconds], "median_s": round(self.median, 6),
                "items": self.items, "items_per_s": round(self.per_second, 4)}


def log(message: str) -> None:
    """Progress on stderr (the table and the JSON are the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def time_call(fn: Callable[[], Any], *, items: int, repeats: int, device: torch.device,
              warmup: Callable[[], Any] | None = None, warmup_runs: int = 1) -> Timing:
    """Median-of-``repeats`` timing of ``fn``, after ``warmup_runs`` calls of ``warmup`` (or ``fn``).

    A cheaper ``warmup`` (the same code on a few inputs) keeps slow baselines affordable; it
    still triggers the one-off costs (kernel selection, allocator growth, lazy imports).
    """
    for _ in range(warmup_runs):
        (warmup or fn)()
    sync(device)
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return Timing(seconds, items)


def time_interleaved(calls: dict[str, tuple[Callable[[], Any], int]], *, repeats: int, device: torch.device,
                     warmups: dict[str, Callable[[], Any]] | None = None) -> dict[str, Timing]:
    """Like :func:`time_call` for several contenders, timed in turns (A B C, A B C, ...).

    On a shared machine the load drifts over minutes; taking turns exposes every contender to
    the same drift, so their ratio stays meaningful even when the absolute times do not.
    ``calls`` maps a name to ``(function, items per call)``; ``warmups`` to a cheaper call.
    """
    warmups = warmups or {}
    for name, (fn, _) in calls.items():
        log(f"warm-up: {name}")
        warmups.get(name, fn)()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name, (fn, _) in calls.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
            log(f"repeat {r + 1}/{repeats}: {name} {seconds[name][-1]:.3f} s")
    return {name: Timing(seconds[name], items) for name, (_, items) in calls.items()}


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    # give freed model-loading buffers back to the OS so the baseline is what is really held
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measure_here(run: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of ``run()`` in this process, relative to what is held before it."""
    import resource

    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = run()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"kind": "cuda max_memory_allocated", "baseline_bytes": base, "peak_bytes": peak,
                "peak_above_baseline_bytes": peak - base, "result": result}
    _trim_heap()
    exact = _reset_peak_rss()
    base_kib = _proc_status_kib("VmRSS")
    before_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run()
    if exact and base_kib is not None:
        peak_kib = _proc_status_kib("VmHWM")
        kind = "RSS high-water mark (VmHWM, reset after setup)"
    else:  # macOS or no /proc: ru_maxrss is bytes there and cannot be reset
        scale = 1024 if sys.platform == "darwin" else 1
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale
        base_kib = before_maxrss // scale
        kind = "ru_maxrss (not resettable: lower bound of the increase)"
    return {"kind": kind, "baseline_bytes": base_kib * 1024, "peak_bytes": peak_kib * 1024,
            "peak_above_baseline_bytes": max(0, peak_kib - base_kib) * 1024, "result": result}


def measure_peak_memory(script: str | Path, function: str, kwargs: dict[str, Any], *,
                        timeout: float = 1800) -> dict[str, Any]:
    """Peak memory of one job, measured in a fresh Python process.

    ``function`` in ``script`` is called with ``kwargs`` (which must hold ``device``) to set up,
    and returns a zero-argument callable: the measured work. Returned keys: ``baseline_bytes``
    (held after setup: weights, inputs), ``peak_bytes`` and ``peak_above_baseline_bytes``
    (what the work itself added at its worst), plus the callable's JSON-able ``result``.
    On CUDA the numbers are ``torch.cuda.max_memory_allocated``; on CPU the RSS high-water mark.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(Path(script).resolve()),
           function, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER):])
    raise RuntimeError(
        f"memory child {function}({kwargs}) failed with exit code {proc.returncode}:\n"
        f"{proc.stderr[-4000:]}"
    )


def _child_main(script: str, function: str, kwargs_json: str) -> None:
    spec = importlib.util.spec_from_file_location(Path(script).stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    kwargs = json.loads(kwargs_json)
    run = getattr(module, function)(**kwargs)
    out = _measure_here(run, torch.device(kwargs["device"]))
    print(CHILD_MARKER + json.dumps(out, default=str), flush=True)


# ----------------------------------------------------------------------------- reporting


def describe_hardware(device: torch.device) -> dict[str, Any]:
    """CPU, memory, threads and (on CUDA) the GPU: enough to compare two result files."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in present]
                break
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    return info


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("pyvene-harm", "pyvene", "torch", "transformers", "scikit-learn", "numpy"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class Target:
    """One target of the issue and whether this run met it."""

    name: str
    value: float | None
    threshold: float
    comparison: str  # ">=" or "<="
    met: bool | None = field(init=False)
    note: str = ""

    def __post_init__(self) -> None:
        if self.value is None:
            self.met = None
        elif self.comparison == ">=":
            self.met = self.value >= self.threshold
        else:
            self.met = self.value <= self.threshold


def check_target(name: str, value: float | None, threshold: float, comparison: str = ">=",
                 note: str = "") -> dict[str, Any]:
    return asdict(Target(name, value, threshold, comparison, note=note))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    Console(width=max(100, sum(len(c) for c in columns) + 40)).print(table)


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    rows = []
    for t in targets:
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        rows.append([t["name"], t["value"], f"{t['comparison']} {t['threshold']}", verdict])
    print_table("targets", ["target", "value", "wanted", "verdict"], rows)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def write_results(path: Path, *, benchmark: str, settings: Settings, model: dict[str, Any] | None,
                  results: dict[str, Any], targets: Sequence[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one result file atomically (sorted, indented JSON) and return its content."""
    payload = {
        "benchmark": benchmark,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": describe_hardware(settings.device),
        "versions": versions(),
        "settings": settings.to_dict(),
        "data": data_source(),
        "model": model,
        "results": results,
        "targets": list(targets),
        "all_targets_met": all(t["met"] for t in targets if t["met"] is not None),
        **(extra or {}),
    }
    atomic_write_json(path, payload)
    return payload


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child_main(*sys.argv[2:])
    else:
        raise SystemExit("usage: python _common.py --child SCRIPT FUNCTION KWARGS_JSON (internal)")
