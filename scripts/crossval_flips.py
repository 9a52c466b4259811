"""Which held-out prompts two designs of a finished `guard crossval` run judge differently.

A crossval table says how many prompts of a source a design gets right; this says which ones
another design gets wrong there, from the run's stored states (its `units/`; nothing is run
through the model again, the fold is fitted again from them, as the run fitted it):

    python scripts/crossval_flips.py results/demo/guard-sentence --source alpacaeval \
        --design linear-last16-mined --design linear-sent16-mined --design linear-sent16-b1

It writes RUN/flips-SOURCE.json: each design's fitted margin (sent designs) and every prompt of
the source (as written) on which the designs' verdicts differ, with each design's decision
(score minus threshold; a sent design's is its sentence-end decision), the prompt's first ten
words and the SHA-256 of the whole prompt (the prompt sets stay in ../shared/data, not in
results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def differing(decisions: dict[str, np.ndarray]) -> list[int]:
    """Rows on which the verdicts (decision > 0) of the designs are not all the same."""
    flagged = np.stack([d > 0 for d in decisions.values()])
    return np.flatnonzero(flagged.any(axis=0) & ~flagged.all(axis=0)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--source", required=True)
    parser.add_argument("--design", action="append", required=True, help="a design of the run, repeatable")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pyvene_harm.guard.crossval import PromptSource, _score_held_out
    from pyvene_harm.guard.designs import GuardDesign
    from pyvene_harm.reads import sentence_width
    from pyvene_harm.recipes.guard_crossval import _load_sets, _load_wraps, _states_unit
    from pyvene_harm.recipes.options import ModelOptions, load_for_recipe
    from pyvene_harm.recipes.rundir import RunDir

    cfg = json.loads((args.run / "config.json").read_text())
    o = cfg["options"]
    designs = {d["name"]: d for d in o["designs"]}
    unknown = [d for d in args.design if d not in designs]
    if unknown:
        sys.exit(f"{args.run} has no design {unknown[0]!r}: choose from {', '.join(designs)}")
    chosen = [GuardDesign(**{**designs[n], "reads": tuple(designs[n]["reads"]),
                             "layers": tuple(designs[n]["layers"]) if designs[n]["layers"] else None,
                             "train_on": tuple(designs[n]["train_on"]) if designs[n]["train_on"] else None})
              for n in args.design]
    sources = [PromptSource(ps.name, ps.prompts, label) for ps, label in _load_sets(tuple(o["sets"]), o["limit"], o["seed"])]
    sources += [PromptSource(n, p, lab) for n, p, lab in _load_wraps(tuple(o["wraps"]), o["limit"], o["seed"])]
    sources += [PromptSource(ps.name, ps.prompts, label, evaluate=False, group=ps.name.rpartition("/")[0] or None)
                for ps, label in _load_sets(tuple(o["pools"]), o["pool_limit"], o["seed"])]
    sources += [PromptSource(ps.name, ps.prompts, label, train=False)
                for ps, label in _load_sets(tuple(o["shifts"]), o["limit"], o["seed"])]
    if args.source not in {s.name for s in sources}:
        sys.exit(f"{args.run} has no source {args.source!r}")
    run = RunDir(args.run, "guard-crossval", dict(o), free=("designs", "states_cache"))
    mopts = ModelOptions(**{k: o.get(k) for k in ("model", "dtype", "device", "batch_size", "system_prompt",
                                                   "template", "prompt_format")},
                         no_system_prompt=bool(o.get("no_system_prompt", False)))
    loaded, fmt = load_for_recipe(mopts)
    sentences = any(sentence_width(d.reads[0]) for d in chosen if not d.is_control)
    blocks = {s.name: _states_unit(run, lambda: (loaded, fmt), s, o["reads"], o["states"],
                                   o["variants"] if s.evaluate and s.train else 0, o["batch_size"], None,
                                   tokens=True, sentences=sentences) for s in sources}
    shared: dict = {}
    scored = {d.name: _score_held_out(blocks, d, args.source, shared) for d in chosen}
    decisions = {n: s.original() for n, s in scored.items()}
    prompts = blocks[args.source].source.prompts
    out = {"run": str(args.run), "source": args.source, "designs": args.design,
           "margins": {n: s.margin for n, s in scored.items() if s.margin is not None},
           "flagged": {n: int((d > 0).sum()) for n, d in decisions.items()}, "n": len(prompts),
           "differ": [{"first_words": " ".join(prompts[i].split()[:10]),
                       "sha256": hashlib.sha256(prompts[i].encode("utf-8")).hexdigest(),
                       **{n: round(float(d[i]), 3) for n, d in decisions.items()}} for i in differing(decisions)]}
    path = args.run / f"flips-{args.source}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    print(json.dumps({k: v for k, v in out.items() if k != "differ"}), f"{len(out['differ'])} prompts differ -> {path}")


if __name__ == "__main__":
    main()
