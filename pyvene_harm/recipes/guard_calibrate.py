"""``pyvene-harm guard calibrate``: set a guard's threshold on a deployment's own traffic.

A threshold learnt on the training sources does not carry over to sources the guard never saw:
they rank well (high AUROC) but their harmless prompts score above it. Deployments therefore set
the threshold on their own prompts: ``--traffic FILE --flag-rate R`` flags at most a share R of
a file of real, unlabelled, mostly harmless traffic; ``--harmless FILE --max-fpr F`` allows at
most a share F of a harmless set to be flagged. The guard is written to ``--out`` with its new
threshold and a record of how it was set (file, its fingerprint, rate, prompts); ``serve`` and
``demo`` print that record at start.
"""

from __future__ import annotations

from pathlib import Path

import click

from .guard_common import bind_model, guard_model_options, load_guard, resolve_model_options
from .options import emit, prompt_set
from .tables import print_table

__all__ = ["calibrate"]


@click.command("calibrate")
@click.option("--guard", "guard_path", required=True, help="Guard folder (from `guard fit`) or Hub repo id.")
@click.option("--traffic", type=click.Path(), default=None,
              help="A file of the deployment's own prompts (unlabelled, mostly harmless); with --flag-rate.")
@click.option("--flag-rate", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of --traffic to flag at most, e.g. 0.01.")
@click.option("--harmless", type=click.Path(), default=None, help="A harmless prompt set; with --max-fpr.")
@click.option("--max-fpr", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="False-positive rate allowed on --harmless, e.g. 0.05.")
@click.option("--field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use a seeded sample of the file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --limit's sample.")
@guard_model_options
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write the recalibrated guard to (may be the guard's own folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the record of the new threshold as JSON to stdout.")
def calibrate(guard_path, traffic, flag_rate, harmless, max_fpr, field, limit, seed, model_args, out, as_json):
    """Set a guard's threshold from real traffic (--traffic + --flag-rate) or a harmless set
    (--harmless + --max-fpr).

    \b
    Example:
      pyvene-harm guard calibrate --guard artifacts/qwen2.5-coder-0.5b-instruct/guard \\
        --traffic pyvene_harm/prompts/example_traffic.jsonl --flag-rate 0.01 -o guards/demo-site
    """
    from ..io_utils import file_sha256

    if (traffic is None) == (harmless is None):
        raise click.UsageError("give --traffic FILE --flag-rate R, or --harmless FILE --max-fpr F (one of them)")
    if traffic is not None and flag_rate is None:
        raise click.UsageError("--traffic needs --flag-rate: the share of that traffic the guard may flag, e.g. 0.01")
    if harmless is not None and max_fpr is None:
        raise click.UsageError("--harmless needs --max-fpr: the share of those prompts the guard may flag, e.g. 0.05")
    if traffic is None and flag_rate is not None or harmless is None and max_fpr is not None:
        raise click.UsageError("--flag-rate goes with --traffic, --max-fpr with --harmless")
    path = traffic or harmless
    ps = prompt_set("traffic" if traffic else "harmless", path, field=field, limit=limit, seed=seed)
    rate, how = (flag_rate, "traffic") if traffic else (max_fpr, "max_fpr")
    if len(ps.prompts) * rate < 1:
        click.echo(f"note: {len(ps.prompts)} prompts at a rate of {rate:.2%} allow no flagged prompt; the threshold "
                   "sits at the highest score (give more prompts for a finer cut)", err=True)
    g = load_guard(guard_path, model_args["revision"])
    mopts = resolve_model_options(model_args, g, guard_path)
    bind_model(g, mopts)
    before = g.describe_threshold()
    try:
        g.set_threshold_by_flag_rate(ps.prompts, rate, how=how,
                                     source={"file": str(path), "file_sha256": file_sha256(Path(path))[:16] if Path(path).is_file() else None,
                                             "field": field, "limit": limit, "seed": seed})
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    g.save(out)
    record = {"guard": str(out), "from": guard_path, **g.selection_}
    print_table(f"Threshold set, guard written to {out}", ["", "value"],
                [["before", before], ["after", g.describe_threshold()],
                 ["share of the file flagged", f"{g.selection_['flagged']:.2%}"]])
    emit(record, as_json)
