"""``pyvene-harm guard reply-set``: labelled replies made on a model, for the reply guard.

Every prompt set gets the plain model's greedy replies; harmful sets also get replies with the
refusal direction removed. Labels come from the prompt's label and the keyword refusal judge
(see :mod:`pyvene_harm.guard.reply_set`). The full reply texts stay in the run's ``units/``
(ignored by git, regenerated from ``config.json``); ``replies.csv`` holds labels, hashes and
each reply's first words.
"""

from __future__ import annotations

from pathlib import Path

import click

from .beliefs import resolve_directions
from .guard_common import exclude_option, labelled_prompt_sets, labelled_sets_option
from .labelled import LazyModel
from .options import emit, model_options
from .rundir import RunDir
from .tables import print_table

__all__ = ["load_reply_rows", "reply_set"]


@click.command("reply-set")
@model_options
@click.option("--directions", "directions_path", required=True,
              help="DirectionSet whose refusal direction is removed to draw out harmful replies. "
                   "Example: --directions artifacts/qwen2.5-coder-0.5b-instruct/directions")
@labelled_sets_option
@exclude_option
@click.option("--limit", type=click.IntRange(min=1), default=32, show_default=True, help="Prompts per set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompt sampling.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens generated per reply.")
@click.option("--judge", type=click.Choice(["keyword", "keyword-multilingual"]), default="keyword",
              show_default=True,
              help="Refusal judge that labels the replies: the paper's English phrases, or those plus the "
                   "same phrases in French, Spanish, German, Russian and Chinese (for sets in those languages).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory (config.json, results.json, replies.csv; full texts under units/); "
                   "re-running resumes.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def reply_set(mopts, directions_path, sets, exclude, limit, seed, max_new_tokens, judge, out, as_json):
    """Generate and label replies: harmful (the model complied with a harmful request, plainly or
    with its refusal direction removed) and safe (any reply to a harmless prompt; a refusal).

    \b
    Example:
      pyvene-harm guard reply-set -m demo --directions artifacts/qwen2.5-coder-0.5b-instruct/directions \\
        --set advbench=../shared/data/rd_processed_advbench.json:harmful \\
        --set xstest=../shared/data/chats_xstest-harmless.json:harmless -o runs/reply-set
    """
    from ..guard.reply_set import public_row, reply_set_counts

    loaded_sets = labelled_prompt_sets(sets, exclude, limit=limit, seed=seed)
    directions = resolve_directions(directions_path)
    run = RunDir(out, "guard-reply-set", {**mopts.as_dict(), "directions": directions_path, "sets": list(sets),
                                          "exclude": exclude[0], "limit": limit, "seed": seed,
                                          "max_new_tokens": max_new_tokens,
                                          # recorded only when not the default, so runs made before
                                          # the option existed resume and reproduce as they are
                                          **({"judge": judge} if judge != "keyword" else {})})
    lazy = LazyModel(mopts)
    rows = []
    for ps, label in loaded_sets:
        plain = run.unit(f"plain_{ps.name}", lambda ps=ps: _replies(lazy, ps, max_new_tokens, mopts.batch_size))
        ablated = None
        if label:
            ablated = run.unit(f"ablated_{ps.name}", lambda ps=ps: _replies(
                lazy, ps, max_new_tokens, mopts.batch_size, directions=directions))
        rows.extend(_rows(ps.name, label, ps.prompts, plain, ablated, judge))
    run.write_csv("replies", [public_row(r) for r in rows])
    counts = reply_set_counts(rows)
    results = {"model": mopts.model, "directions": directions_path, "judge": judge, "n": len(rows),
               "harmful": sum(r.label for r in rows), "safe": sum(1 - r.label for r in rows), "counts": counts}
    run.write_results(results)
    print_table("labelled replies", ["source", "kind", "label", "n"],
                [[c["source"], c["kind"], "harmful" if c["label"] else "safe", str(c["n"])] for c in counts])
    emit(results, as_json)


def _replies(lazy: LazyModel, ps, max_new_tokens: int, batch_size: int, directions=None) -> dict:
    from ..analysis import label_replies
    from ..interventions import ablate

    loaded, fmt = lazy()
    steer = None if directions is None else ablate(loaded.model, directions, direction="refusal")
    what = "ablated" if steer is not None else "plain"
    lab = label_replies(loaded.model, fmt, ps.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        steer=steer, progress=f"{what} replies to {ps.name}")
    return {"prompts": lab.prompts, "replies": lab.replies, "refused": lab.refused}


def _rows(name: str, label: int, prompts, plain: dict, ablated: dict | None, judge: str = "keyword"):
    """Rows of one set from its stored replies; the units hold the keyword judge's verdicts, and
    any other judge reads the replies again (so a judge changes labels, never generation)."""
    from ..guard.reply_set import label_replies_of_set
    from ..judges import get_judge

    def refused(unit: dict) -> list[bool]:
        return list(unit["refused"]) if judge == "keyword" else get_judge(judge)(unit["prompts"], unit["replies"])

    return label_replies_of_set(name, label, prompts, plain["replies"], refused(plain),
                                None if ablated is None else ablated["replies"],
                                None if ablated is None else refused(ablated), judge=judge)


def load_reply_rows(run_dir: str | Path):
    """The labelled rows of a finished ``guard reply-set`` run, full texts included, read from
    its ``units/``; a clear error where they are gone (a fresh clone has only the public CSV)."""
    from ..io_utils import read_json
    from .guard_common import parse_labelled_sets

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file() or read_json(cfg_path).get("command") != "guard-reply-set":
        raise click.BadParameter(f"{run_dir} is not a `guard reply-set` run directory (no config.json of one)",
                                 param_hint="--replies")
    opts = read_json(cfg_path)["options"]
    rows = []
    for name, _path, label in parse_labelled_sets(tuple(opts["sets"])):
        units = {k: run_dir / "units" / f"{k}_{name}.json" for k in ("plain", "ablated")}
        if not units["plain"].is_file() or (label and not units["ablated"].is_file()):
            raise click.BadParameter(
                f"{run_dir} lacks the replies of set {name!r} (units/ is not in git): regenerate them with the "
                f"same options, e.g. `pyvene-harm guard reply-set ... -o {run_dir}` as its config.json records",
                param_hint="--replies")
        plain = read_json(units["plain"])["value"]
        ablated = read_json(units["ablated"])["value"] if label else None
        rows.extend(_rows(name, label, plain["prompts"], plain, ablated, opts.get("judge", "keyword")))
    return rows
