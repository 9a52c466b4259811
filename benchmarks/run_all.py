"""Run every benchmark, one process each, and print a summary of their targets.

    python benchmarks/run_all.py --quick                 # seconds: the smoke test
    python benchmarks/run_all.py                         # CPU defaults (about 25 minutes on 2 cores)
    python benchmarks/run_all.py --device cuda --out-dir benchmarks/results/h100

Each script writes ``<out-dir>/<name>.json``; this one adds ``<out-dir>/summary.json``.
Extra arguments after ``--`` are passed to every script (e.g. ``-- --repeats 5``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
SCRIPTS = ("extraction", "guard", "steering", "memory", "preparation", "serve", "reply_guard")


def markdown(rows: Sequence[Sequence], device: torch.device) -> str:
    """The targets as a Markdown table, with the hardware, for the README's Performance section."""
    hw = C.describe_hardware(device)
    where = hw.get("gpu") or f"{hw['cpu']}, {hw['cpu_count']} cores"
    lines = [f"Measured on {where} ({' '.join(sys.argv[1:]) or 'defaults'}):", "",
             "| benchmark: target | value | wanted | verdict |", "|---|---|---|---|"]
    for name, value, wanted, verdict in rows:
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} | {wanted} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out-dir", type=Path, default=C.RESULTS_DIR)
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    args = parser.parse_args(argv)

    summary, failed = {}, []
    for name in args.only:
        out = args.out_dir / f"{name}.json"
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--out", str(out)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--device", args.device] if args.device else []
        cmd += ["--model", args.model] if args.model else []
        cmd += passthrough
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd)
        elapsed = time.perf_counter() - start
        entry = {"exit_code": code, "seconds": round(elapsed, 1), "results": str(out)}
        if out.is_file():
            data = json.loads(out.read_text())
            entry["targets"] = data["targets"]
        if code != 0:
            failed.append(name)
        summary[name] = entry

    rows = []
    for name, entry in summary.items():
        for t in entry.get("targets", []):
            verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
            rows.append([f"{name}: {t['name']}", t["value"], f"{t['comparison']} {t['threshold']}", verdict])
        if entry["exit_code"] != 0:
            rows.append([f"{name}: exit code", entry["exit_code"], "0", "FAILED"])
    C.print_table("all benchmarks", ["target", "value", "wanted", "verdict"], rows)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    C.atomic_write_json(args.out_dir / "summary.json", {
        "scripts": summary, "failed": failed, "hardware": C.describe_hardware(device),
        "versions": C.versions(), "command": " ".join([Path(sys.executable).name, *sys.argv])})
    (args.out_dir / "summary.md").write_text(markdown(rows, device))
    print(f"wrote {args.out_dir / 'summary.json'} and summary.md (a table for the README)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
