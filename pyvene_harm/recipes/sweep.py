"""Shared machinery of the layer-sweep recipes (elicit, invert): one resumable unit per layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["layer_sweep", "plot_sweep"]


def layer_sweep(run, lazy, directions, prompts: Sequence[str], *, name: str, direction: str | None,
                layers: Sequence[int], coeff: float, positions: str, wrapper: str | None, generated: bool,
                max_new_tokens: int, batch_size: int, score: Callable[[list[str], list[str]], dict]) -> list[dict]:
    """Rows ``{condition, layer, **score}``; ``direction=None`` is the unsteered baseline (layer -1)."""
    from ..analysis import steered_replies
    from ..generation import generate_replies

    rows = []
    for layer in ([-1] if direction is None else layers):
        def compute(layer=layer):
            loaded, fmt = lazy()
            if direction is None:
                replies = generate_replies(loaded.model, fmt, prompts, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size, wrapper=wrapper, progress=f"{name} baseline")
            else:
                replies = steered_replies(loaded.model, fmt, prompts, directions, direction=direction, layer=layer,
                                          coeff=coeff, positions=positions, generated=generated, wrapper=wrapper,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size,
                                          progress=f"{name} layer {layer}")
            return {"replies": replies, **score(list(prompts), replies)}

        unit = run.unit(f"{name}_layer{layer}", compute)
        rows.append({"condition": name, "layer": layer, **{k: v for k, v in unit.items() if k != "replies"}})
    return rows


def plot_sweep(run, rows: list[dict], *, metric: str, ylabel: str, title: str, filename: str,
               baselines: dict[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for cond in dict.fromkeys(r["condition"] for r in rows if r["layer"] >= 0):
        pts = sorted((r["layer"], r[metric]) for r in rows if r["condition"] == cond and r["layer"] >= 0)
        # a rate over no valid answer is None: a gap in the line, not a zero
        line, = ax.plot([p[0] for p in pts], [float("nan") if p[1] is None else p[1] for p in pts], marker="o",
                        ms=3, label=cond)
        if baselines and cond in baselines and baselines[cond] is not None:
            ax.axhline(baselines[cond], color=line.get_color(), ls="--", lw=0.8)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("steered layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    run.save_figure(fig, filename)
