"""``pyvene-harm post-inst`` (Table 1): refusal with and without post-instruction tokens."""

from __future__ import annotations

import click

from .options import emit, load_for_recipe, model_options, prompt_set, run_options
from .rundir import RunDir
from .tables import print_table

__all__ = ["post_inst"]

PAPER = {"Llama2": (100.0, 85.3), "Llama3": (96.0, 58.9), "Qwen2": (98.0, 81.3)}


@click.command("post-inst")
@model_options
@run_options
@click.option("--harmful", type=click.Path(), required=True,
              help="Harmful prompts. Example: --harmful ../shared/data/chats_advbench.json")
@click.option("--field", default=None, help="Field holding the prompt (auto-detected if omitted).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Prompts, sampled with --seed.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated to judge refusal (the release judged 128 for Table 1; refusals that start late are missed with fewer).")
def post_inst(mopts, out, seed, as_json, harmful, field, limit, max_new_tokens):
    """Refusal rate on harmful prompts with and without the post-instruction tokens.

    \b
    Example:
      pyvene-harm post-inst -m demo --harmful ../shared/data/chats_advbench.json -o runs/post-inst
    """
    ps = prompt_set("harmful", harmful, field=field, limit=limit, seed=seed)
    run = RunDir(out, "post-inst", {**mopts.as_dict(), "harmful": harmful, "field": field, "limit": limit,
                                    "seed": seed, "max_new_tokens": max_new_tokens})
    state: dict = {}

    def model_and_fmt():
        if not state:
            state["m"], state["fmt"] = load_for_recipe(mopts)
        return state["m"], state["fmt"]

    from ..analysis import label_replies
    from ..judges import is_refusal_release

    rows, rates = [], {}
    for variant, post in (("with", True), ("without", False)):
        def compute(post=post, variant=variant):
            loaded, fmt = model_and_fmt()
            lab = label_replies(loaded.model, fmt, ps.prompts, max_new_tokens=max_new_tokens,
                                batch_size=mopts.batch_size, post_instruction=post,
                                progress=f"{variant} post-inst")
            return {"replies": lab.replies, "refused": lab.refused}

        unit = run.unit(f"replies_{variant}", compute)
        rates[variant] = 100.0 * sum(unit["refused"]) / len(unit["refused"])
        for p, r, f in zip(ps.prompts, unit["replies"], unit["refused"]):
            # the release's judge beside the project's: what folding apostrophes changes, per reply
            rows.append({"variant": variant, "prompt": p, "reply": r, "refused": f,
                         "refused_release_judge": is_refusal_release(r)})
    run.write_csv("replies", rows)
    results = {"n_prompts": len(ps.prompts), "refusal_rate_with_post_inst": rates["with"],
               "refusal_rate_without_post_inst": rates["without"],
               "paper": {k: {"with": a, "without": b} for k, a, b in ((k, *v) for k, v in PAPER.items())}}
    run.write_csv("table1", [{"model": "this run", "with": rates["with"], "without": rates["without"]}]
                  + [{"model": f"paper {k}", "with": a, "without": b} for k, (a, b) in PAPER.items()])
    run.write_results(results)
    _plot(run, rates)
    print_table("Table 1: refusal rate on harmful prompts (%)", ["model", "with post-inst", "without"],
                [["this run", f"{rates['with']:.1f}", f"{rates['without']:.1f}"]]
                + [[f"paper {k}", f"{a:.1f}", f"{b:.1f}"] for k, (a, b) in PAPER.items()])
    emit(results, as_json)


def _plot(run, rates):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(["with", "without"], [rates["with"], rates["without"]], color=["tab:red", "tab:blue"])
    ax.set_ylabel("refusal rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("post-instruction tokens")
    run.save_figure(fig, "post_inst")
