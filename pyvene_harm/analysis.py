"""The paper's analyses as plain functions: labelling by refusal, Table 1, Fig. 2 clustering.

Recipes call these; users can call them from Python on their own models and prompt sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import cosine_similarity

from .generation import generate_replies
from .judges import KeywordRefusalJudge
from .positions import ChatFormatter

__all__ = [
    "LabelledReplies",
    "cluster_closeness",
    "label_replies",
    "post_instruction_ablation",
    "steered_replies",
]


@dataclass(frozen=True)
class LabelledReplies:
    prompts: list[str]
    replies: list[str]
    refused: list[bool]

    @property
    def refusal_rate(self) -> float:
        return sum(self.refused) / max(len(self.refused), 1)

    def select(self, refused: bool) -> list[str]:
        return [p for p, r in zip(self.prompts, self.refused) if r == refused]


def label_replies(model: nn.Module, formatter: ChatFormatter, prompts: Sequence[str], *, judge=None,
                  max_new_tokens: int = 128, batch_size: int = 8, post_instruction: bool = True,
                  steer=None, progress: bool | str = False) -> LabelledReplies:
    """Generate greedy replies and judge each as refusal or not."""
    judge = judge or KeywordRefusalJudge()
    replies = generate_replies(model, formatter, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, post_instruction=post_instruction, steer=steer,
                               progress=progress)
    return LabelledReplies(list(prompts), replies, list(judge(list(prompts), replies)))


def post_instruction_ablation(model: nn.Module, formatter: ChatFormatter, prompts: Sequence[str], *,
                              judge=None, max_new_tokens: int = 128, batch_size: int = 8,
                              progress: bool = False) -> dict[str, LabelledReplies]:
    """Table 1: the same prompts with and without the template's post-instruction tokens.

    Without them the prompt ends at t_inst, so the model continues the user's turn; a drop in
    refusal shows that refusal is decided at the post-instruction tokens.
    """
    return {
        "with": label_replies(model, formatter, prompts, judge=judge, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress and "with post-inst"),
        "without": label_replies(model, formatter, prompts, judge=judge, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, post_instruction=False,
                                 progress=progress and "without post-inst"),
    }


def cluster_closeness(states: Mapping[str, torch.Tensor], *, harmful: str, harmless: str,
                      probes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Fig. 2: per layer, the share of each probe group closer to the harmful cluster.

    Args:
        states: group -> per-prompt states ``[n, S, d]`` at one position.
        harmful / harmless: the reference groups (e.g. refused-harmful, accepted-harmless),
            whose centroids define the two clusters.
        probes: groups to place (e.g. accepted-harmful, refused-harmless).

    Returns:
        group -> ``[S]`` fraction of its prompts whose cosine to the harmful centroid exceeds
        that to the harmless centroid (1.0 = all sit in the harmful cluster). The reference
        groups are included, scored against centroids that leave each prompt out, so that
        they read as a sanity check rather than a tautology.
    """
    mu_h = states[harmful].double().mean(0)
    mu_l = states[harmless].double().mean(0)
    out = {}
    for g in probes:
        if g not in states or len(states[g]) == 0:
            continue
        x = states[g].double()
        out[g] = (cosine_similarity(x, mu_h.unsqueeze(0), dim=-1)
                  > cosine_similarity(x, mu_l.unsqueeze(0), dim=-1)).double().mean(0)
    for g, mu_own, mu_other, own_is_harmful in ((harmful, mu_h, mu_l, True), (harmless, mu_l, mu_h, False)):
        x = states[g].double()
        n = len(x)
        if n < 2:
            continue
        loo = (mu_own.unsqueeze(0) * n - x) / (n - 1)  # each prompt's own centroid without it
        own = cosine_similarity(x, loo, dim=-1)
        other = cosine_similarity(x, mu_other.unsqueeze(0), dim=-1)
        closer_to_harmful = own > other if own_is_harmful else other > own
        out[g] = closer_to_harmful.double().mean(0)
    return out


def steered_replies(model: nn.Module, formatter: ChatFormatter, prompts: Sequence[str], directions, *,
                    direction: str, layer: int, coeff: float, positions: str = "all_prompt",
                    generated: bool = False, wrapper: str | None = None, max_new_tokens: int = 100,
                    batch_size: int = 8, progress: bool | str = False) -> list[str]:
    """Greedy replies with ``coeff *`` a direction added at one layer (Figs. 4 and 5).

    The paper steers the prompt pass only (generated tokens see the steered cache); pass
    ``generated=True`` to steer every new token as well.
    """
    from .interventions import steer

    s = steer(model, directions, direction=direction, layer=layer, coeff=coeff, positions=positions,
              generated=generated)
    return generate_replies(model, formatter, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            wrapper=wrapper, steer=s, progress=progress)
