"""The five-line path: split prompts by the model's own refusals and extract both directions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .collect import ActivationStats, collect_stats
from .data import fingerprint
from .directions import DirectionSet, model_provenance
from .generation import generate_replies
from .judges import KeywordRefusalJudge
from .positions import ChatFormatter
from .progress import progress_label

__all__ = ["Extraction", "extract_directions", "label_by_refusal"]


@dataclass(frozen=True)
class Extraction:
    directions: DirectionSet
    stats: ActivationStats
    groups: dict[str, list[str]]
    """The group of each prompt, e.g. ``harmful_refused``, keyed by set name."""
    replies: dict[str, list[str]]


def label_by_refusal(prompts: Sequence[str], replies: Sequence[str], prefix: str, judge=None) -> list[str]:
    """``{prefix}_refused`` / ``{prefix}_accepted`` per reply."""
    judge = judge or KeywordRefusalJudge()
    flags = judge(list(prompts), list(replies))
    return [f"{prefix}_refused" if f else f"{prefix}_accepted" for f in flags]


def extract_directions(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    formatter: ChatFormatter | None = None,
    split_by_refusal: bool = True,
    judge=None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    keep_layers: Sequence[int] | None = None,
    pool_refusal_groups: bool = False,
    model_id: str | None = None,
    progress: bool | None = None,
) -> Extraction:
    """Harmfulness and refusal directions for ``model`` from two prompt lists.

    With ``split_by_refusal`` (the paper's setting) the model first answers every prompt;
    the harmfulness centroids then use harmful prompts it refused and harmless prompts it
    accepted. ``pool_refusal_groups`` makes the refusal direction use every refused prompt vs
    every accepted one, whatever their harmfulness.

    The replies are the slow part (``max_new_tokens`` per prompt: minutes on a CPU), so a
    progress bar counts them when stderr is a terminal (``progress=False`` hides it, ``True``
    shows it anywhere).

    Example:
        >>> from pyvene_harm import load_model, load_prompts, extract_directions
        >>> m = load_model("demo")
        >>> ex = extract_directions(m.model, m.tokenizer, load_prompts("advbench.json", limit=60),
        ...                         load_prompts("alpaca.json", limit=60))
        >>> ex.directions.save("directions/")
    """
    fmt = formatter or ChatFormatter(tokenizer)
    if not harmful or not harmless:
        raise ValueError("both prompt lists need at least one prompt")
    replies: dict[str, list[str]] = {}
    if split_by_refusal:
        replies["harmful"] = generate_replies(model, fmt, harmful, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, progress=progress_label(progress, "answering harmful"))
        replies["harmless"] = generate_replies(model, fmt, harmless, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, progress=progress_label(progress, "answering harmless"))
        groups = {"harmful": label_by_refusal(harmful, replies["harmful"], "harmful", judge),
                  "harmless": label_by_refusal(harmless, replies["harmless"], "harmless", judge)}
    else:
        groups = {"harmful": ["harmful"] * len(harmful), "harmless": ["harmless"] * len(harmless)}
    prompts = list(harmful) + list(harmless)
    labels = groups["harmful"] + groups["harmless"]
    stats = collect_stats(model, fmt, prompts, labels, batch_size=batch_size, keep_layers=keep_layers,
                          progress=progress_label(progress, "collecting"))
    if split_by_refusal:
        roles = {"harmful": "harmful_refused", "harmless": "harmless_accepted"}
        if pool_refusal_groups:
            present = set(labels)
            roles["refused"] = [g for g in ("harmful_refused", "harmless_refused") if g in present]
            roles["accepted"] = [g for g in ("harmless_accepted", "harmful_accepted") if g in present]
        for role, group in roles.items():
            if isinstance(group, str) and group not in set(labels):
                raise ValueError(
                    f"the model produced no {group.replace('_', ' ')} prompts, so there is no {role} centroid: "
                    "give more prompts, or pass split_by_refusal=False"
                )
    else:
        roles = {"harmful": "harmful", "harmless": "harmless"}
    meta = model_provenance(model, fmt)
    if model_id:
        meta["model_id"] = model_id
    meta["data"] = {"harmful": {"n": len(harmful), "fingerprint": fingerprint(harmful)},
                    "harmless": {"n": len(harmless), "fingerprint": fingerprint(harmless)},
                    "split_by_refusal": split_by_refusal}
    directions = DirectionSet.from_stats(stats, metadata=meta, **roles)
    return Extraction(directions=directions, stats=stats, groups=groups, replies=replies)
