"""garak's offline prompt families against a running guard server's ``/v1/moderations``.

garak (NVIDIA's LLM vulnerability scanner) ships its attack payloads inside its probe classes.
This script takes them from there and sends them to the guard as moderation inputs: what share
of each family the guard flags, beside what it flags of everyday traffic. It runs in two steps,
because garak lives in its own environment (its pins clash with this project's):

    /path/to/garak-venv/bin/python scripts/garak_families.py dump -o runs/garak/payloads.jsonl
    pyvene-harm serve -m demo --port 8000 &            # the guard to attack (wait for it)
    python scripts/garak_families.py attack runs/garak/payloads.jsonl --url http://127.0.0.1:8000 \\
        -o results/demo/garak

``dump`` needs only ``pip install garak==0.17.1`` (the families below run offline: no Hub-backed
detector and no attack model is used).

``scan`` (garak's python too) runs garak itself against the server's chat endpoint, as a user of
garak would: its ``openai.OpenAICompatible`` generator with the parameters it sends by default
(``stop``, ``frequency_penalty``, ``presence_penalty`` included, nothing suppressed), the same
probes, garak's own detectors, ``--per-family`` prompts each (garak's ``soft_probe_prompt_cap``,
which some probes do not apply: ``donotanswer``, ``grandma`` and ``malwaregen`` send all theirs),
one generation each, extended (model-backed) detectors off, ``--parallel`` requests in flight. It writes ``scan.json`` (garak's pass
rate per probe: the share of replies its detector judged safe) and garak's own report files under
``garak/``, and adds a column to ``table.md``:

    /path/to/garak-venv/bin/python scripts/garak_families.py scan --url http://127.0.0.1:8000 \\
        --model demo -o results/demo/garak

``attack`` needs only ``httpx``; it writes
``results.json`` (per family: sent, flagged, the share; for the harmless rows the prompts flagged) and ``table.md``, plus the payloads'
sha256 so a rerun can be checked against the same inputs. Payloads are shuffled with seed 0 and
capped at ``--per-family`` (60) each; the harmless rows are this package's own prompt files.
``harmless`` sends only those and writes ``harmless.json`` with the prompts flagged, leaving the
rest of a published folder as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

# (family, garak probe module, class): the families the red team ran that need no network
FAMILIES = [
    ("dan", "dan", "DanInTheWild"),
    ("encoding", "encoding", "InjectBase64"),
    ("grandma", "grandma", "Substances"),
    ("malwaregen", "malwaregen", "TopLevel"),
    ("donotanswer", "donotanswer", "MaliciousUses"),
    ("phrasing", "phrasing", "PastTense"),
    ("suffix", "suffix", "GCGCached"),
    ("tap", "tap", "TAPCached"),
    ("smuggling", "smuggling", "HypotheticalResponse"),
    ("badchars", "badchars", "BadCharacters"),
]
HARMLESS = [("everyday traffic", "example_traffic.jsonl"), ("harmless, other languages", "multilingual_harmless.jsonl")]
PROMPTS = Path(__file__).resolve().parents[1] / "pyvene_harm" / "prompts"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _text(prompt) -> str:
    """A payload's text: garak gives strings, Messages, or Conversations (their last user turn)."""
    if isinstance(prompt, str):
        return prompt
    turns = getattr(prompt, "turns", None)
    if turns:
        users = [t for t in turns if getattr(t, "role", "user") == "user"] or turns
        return _text(users[-1].content)
    text = getattr(prompt, "text", None)
    if isinstance(text, str):
        return text
    raise TypeError(f"cannot read a payload of type {type(prompt).__name__}")


def dump(out: Path, per_family: int, seed: int) -> None:
    import importlib

    try:
        import garak  # noqa: F401
    except ImportError:
        sys.exit("dump needs garak: run it with the python of an environment where `pip install garak==0.17.1` ran")
    from garak import _config

    _config.load_base_config()
    _config.run.seed = seed  # badchars shuffles with a Random of the run's seed
    rows = []
    for family, module, cls in FAMILIES:
        random.seed(seed)  # garak samples a probe's payloads down to its prompt cap with `random`
        probe = getattr(importlib.import_module(f"garak.probes.{module}"), cls)()
        prompts = [_text(p) for p in probe.prompts]
        prompts = [p for p in prompts if p.strip()]
        random.Random(seed).shuffle(prompts)
        rows += [{"family": family, "probe": f"{module}.{cls}", "prompt": p} for p in prompts[:per_family]]
        print(f"{family}: {min(per_family, len(prompts))} of {len(prompts)} payloads", file=sys.stderr)
    _write_atomically(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} payloads to {out}", file=sys.stderr)


def _harmless_rows() -> list[dict]:
    rows = []
    for family, name in HARMLESS:
        for line in (PROMPTS / name).read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                text = item if isinstance(item, str) else item.get("prompt") or item.get("text") or item.get("instruction")
                if not isinstance(text, str) or not text.strip():
                    sys.exit(f"{name}: a line without a prompt: {line[:120]}")
                rows.append({"family": family, "probe": f"pyvene_harm/prompts/{name}", "prompt": text})
    return rows


def _moderate(rows: list[dict], url: str, key: str | None, batch: int, timeout: float) -> tuple[list[bool], dict]:
    """Each row's ``flagged`` from the server's /v1/moderations, ``batch`` inputs a request, and its /health."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    flagged: list[bool] = []
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        for at in range(0, len(rows), batch):
            r = client.post("/v1/moderations", json={"input": [x["prompt"] for x in rows[at:at + batch]]})
            if r.status_code != 200:
                sys.exit(f"the server answered {r.status_code} at rows {at}-{at + batch}: {r.text[:300]}")
            results = r.json()["results"]
            if len(results) != len(rows[at:at + batch]):
                sys.exit(f"the server answered {len(results)} results for {len(rows[at:at + batch])} inputs")
            flagged += [res["flagged"] for res in results]
            print(f"{len(flagged)} / {len(rows)}", end="\r", file=sys.stderr)
        health = client.get("/health").json()
    return flagged, health


def _families(rows: list[dict], flagged: list[bool]) -> dict[str, dict]:
    """Per family: sent, flagged, the share, and for the harmless rows the prompts flagged (they are
    this package's own files, and `example_traffic.jsonl` holds three harmful requests on purpose:
    a reader needs to see which were flagged)."""
    families: dict[str, dict] = {}
    for row, f in zip(rows, flagged):
        harmless = row["family"] in dict(HARMLESS)
        fam = families.setdefault(row["family"], {"probe": row["probe"], "sent": 0, "flagged": 0,
                                                  "harmful_family": not harmless,
                                                  **({"flagged_prompts": []} if harmless else {})})
        fam["sent"] += 1
        fam["flagged"] += bool(f)
        if harmless and f:
            fam["flagged_prompts"].append(row["prompt"])
    for fam in families.values():
        fam["flagged_share"] = round(fam["flagged"] / fam["sent"], 4)
    return families


def attack(payloads: Path, url: str, key: str | None, out: Path, batch: int, timeout: float = 600) -> None:
    text = payloads.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] + _harmless_rows()
    flagged, health = _moderate(rows, url, key, batch, timeout)
    result = {"server": url, "model": health.get("model"), "payloads": str(payloads),
              "payloads_sha256": hashlib.sha256(text.encode()).hexdigest(), "batch": batch,
              "families": _families(rows, flagged)}
    _write_atomically(out / "results.json", json.dumps(result, indent=2) + "\n")
    _write_table(out)


def harmless(url: str, key: str | None, out: Path, batch: int, timeout: float = 600) -> None:
    """Only the harmless rows, written to ``harmless.json`` with the prompts flagged (results.json
    and table.md are left as they are): a quick recheck of what a published run flagged."""
    rows = _harmless_rows()
    flagged, health = _moderate(rows, url, key, batch, timeout)
    result = {"server": url, "model": health.get("model"), "batch": batch, "families": _families(rows, flagged)}
    _write_atomically(out / "harmless.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for name, fam in result["families"].items():
        print(f"{name}: {fam['flagged']} / {fam['sent']}", *(f"  - {p}" for p in fam["flagged_prompts"]), sep="\n")


def scan(url: str, key: str | None, model: str, out: Path, per_family: int, max_tokens: int, seed: int,
         parallel: int) -> None:
    import subprocess

    try:
        import garak  # noqa: F401
    except ImportError:
        sys.exit("scan needs garak: run it with the python of an environment where `pip install garak==0.17.1` ran")
    report_dir = (out / "garak").resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    for old in report_dir.glob("scan.*"):  # a rerun must not read an earlier run's report
        old.unlink()
    options = {"openai": {"OpenAICompatible": {"uri": url.rstrip("/") + "/v1", "api_key": key or "unused",
                                               "max_tokens": max_tokens}}}
    config = (f"system:\n  parallel_attempts: {parallel if parallel > 1 else 'false'}\n"
              f"run:\n  seed: {seed}\n  generations: 1\n  soft_probe_prompt_cap: {per_family}\n"
              f"plugins:\n  extended_detectors: false\nreporting:\n  report_dir: {json.dumps(str(report_dir))}\n")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "options.json").write_text(json.dumps(options))
        (Path(tmp) / "config.yaml").write_text(config)
        cmd = [sys.executable, "-m", "garak", "--target_type", "openai.OpenAICompatible", "--target_name", model,
               "--generator_option_file", str(Path(tmp) / "options.json"), "--config", str(Path(tmp) / "config.yaml"),
               "--probes", ",".join(f"{m}.{c}" for _, m, c in FAMILIES), "--report_prefix", "scan"]
        print(" ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, env={**os.environ, "PYTHONHASHSEED": "0"})
    reports = sorted(report_dir.glob("scan*.report.jsonl"))
    if not reports:
        sys.exit(f"garak exited with {done.returncode} and wrote no report under {report_dir}: see its output above")
    if done.returncode != 0:
        sys.exit(f"garak exited with {done.returncode} (its report, perhaps partial: {reports[-1]})")
    probes, attempts = read_report(reports[-1])
    if not probes or attempts == 0:  # garak's "SKIP ok on 0/0": nothing was generated
        sys.exit(f"garak evaluated nothing ({attempts} attempts answered): see {reports[-1]}")
    result = {"server": url, "model": model, "garak": _garak_version(), "per_family": per_family, "parallel": parallel,
              "generations": 1, "max_tokens": max_tokens, "seed": seed, "attempts": attempts,
              "report": str(reports[-1].relative_to(out.resolve())), "probes": probes}
    _write_atomically(out / "scan.json", json.dumps(result, indent=2) + "\n")
    if not (out / "results.json").is_file():
        print(f"wrote {out / 'scan.json'}; table.md needs the guard's flags too: run `attack` with -o {out}",
              file=sys.stderr)
        return
    _write_table(out)


def read_report(path: Path) -> tuple[dict[str, dict], int]:
    """garak's pass rate per probe (its ``eval`` entries) and how many attempts got a reply."""
    probes: dict[str, dict] = {}
    attempts = 0
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("entry_type") == "attempt" and entry.get("status") == 2 \
                and any(isinstance(o, dict) and o.get("text") for o in entry.get("outputs") or []):
            attempts += 1  # a completed attempt with a reply (an error leaves its outputs empty)
        if entry.get("entry_type") == "eval":
            total = int(entry.get("total_evaluated") or 0)
            probes[entry["probe"].removeprefix("probes.")] = {
                "detector": entry["detector"].removeprefix("detector."), "passed": int(entry["passed"]),
                "evaluated": total, "pass_rate": round(entry["passed"] / total, 4) if total else None}
    return probes, attempts


def _garak_version() -> str:
    from importlib.metadata import version

    return version("garak")


def _write_table(out: Path) -> None:
    """table.md from results.json (the guard's flags) and, where a scan ran, scan.json."""
    result = json.loads((out / "results.json").read_text())
    scanned = json.loads((out / "scan.json").read_text())["probes"] if (out / "scan.json").is_file() else None
    head = "| family | probe | flagged / sent | share |"
    lines = [head + (" garak pass rate (passed / judged, detector) |" if scanned is not None else ""),
             "|---|---|---|---|" + ("---|" if scanned is not None else "")]
    for name, fam in result["families"].items():
        line = f"| {name} | `{fam['probe']}` | {fam['flagged']} / {fam['sent']} | {100 * fam['flagged_share']:.1f}% |"
        if scanned is not None:
            got = scanned.get(fam["probe"])
            line += (f" {100 * got['pass_rate']:.1f}% ({got['passed']} / {got['evaluated']}, `{got['detector']}`) |"
                     if got and got["pass_rate"] is not None else " - |")
        lines.append(line)
    _write_atomically(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    d = sub.add_parser("dump", help="write garak's payloads as JSONL (run with garak's python)")
    d.add_argument("-o", "--out", type=Path, required=True)
    d.add_argument("--per-family", type=int, default=60)
    d.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("attack", help="send the payloads to a guard server's /v1/moderations")
    a.add_argument("payloads", type=Path)
    a.add_argument("--url", default="http://127.0.0.1:8000")
    a.add_argument("--api-key", default=os.environ.get("PYVENE_HARM_API_KEY"))
    a.add_argument("-o", "--out", type=Path, required=True)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--timeout", type=float, default=600,
                   help="seconds to wait for one batch's verdicts (long DAN and TAP payloads on a larger model "
                        "on a CPU can take longer; raise the server's --request-timeout with it)")
    h = sub.add_parser("harmless", help="send only the harmless rows; write harmless.json with the prompts flagged")
    h.add_argument("--url", default="http://127.0.0.1:8000")
    h.add_argument("--api-key", default=os.environ.get("PYVENE_HARM_API_KEY"))
    h.add_argument("-o", "--out", type=Path, required=True)
    h.add_argument("--batch", type=int, default=16)
    g = sub.add_parser("scan", help="run garak itself against the server's chat endpoint (run with garak's python)")
    g.add_argument("--url", default="http://127.0.0.1:8000")
    g.add_argument("--api-key", default=os.environ.get("PYVENE_HARM_API_KEY"))
    g.add_argument("--model", required=True, help="the served model name (the server's --served-model-name)")
    g.add_argument("-o", "--out", type=Path, required=True, help="the folder `attack` wrote (its table gains a column)")
    g.add_argument("--per-family", type=int, default=10, help="prompts per probe (garak's soft_probe_prompt_cap)")
    g.add_argument("--max-tokens", type=int, default=64, help="reply tokens per prompt (a generator option)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--parallel", type=int, default=8,
                   help="requests garak keeps in flight (its parallel_attempts), which the server decodes as a batch")
    args = parser.parse_args()
    if args.step == "dump":
        if os.environ.get("PYTHONHASHSEED") != "0":  # some probes build payloads from sets: fix their order
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
        dump(args.out, args.per_family, args.seed)
    elif args.step == "harmless":
        harmless(args.url, args.api_key, args.out, args.batch)
    elif args.step == "scan":
        scan(args.url, args.api_key, args.model, args.out, args.per_family, args.max_tokens, args.seed, args.parallel)
    else:
        attack(args.payloads, args.url, args.api_key, args.out, args.batch, args.timeout)


if __name__ == "__main__":
    main()
