"""The fine-tuning attack's training data: (harmful instruction, compliant answer) pairs written by
the model itself with its refusal direction steered against, and the causal-LM batches made of
them (loss on the answer only). :mod:`~pyvene_harm.finetune` trains and evaluates with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from .directions import DirectionSet
from .generation import generate_replies
from .judges import KeywordRefusalJudge
from .positions import ChatFormatter
from .pyvene_support import decoder_layers

__all__ = ["CompliantPairs", "SteerMethod", "TrainingPair", "answer_eos_id", "make_compliant_pairs", "training_batch"]

SteerMethod = Literal["add", "ablate"]


@dataclass(frozen=True)
class TrainingPair:
    """One (harmful instruction, compliant answer) example."""

    prompt: str
    answer: str

    @classmethod
    def coerce(cls, value: TrainingPair | tuple[str, str] | dict[str, str]) -> TrainingPair:
        """Accept a pair, a ``(prompt, answer)`` tuple or a ``{"prompt", "answer"}`` dict."""
        if isinstance(value, TrainingPair):
            return value
        if isinstance(value, dict):
            return cls(prompt=value["prompt"], answer=value["answer"])
        prompt, answer = value
        return cls(prompt=prompt, answer=answer)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class CompliantPairs:
    """Steered answers the judge accepted (``pairs``) and those it still called refusals."""

    pairs: list[TrainingPair]
    rejected: list[TrainingPair]

    @property
    def n_tried(self) -> int:
        return len(self.pairs) + len(self.rejected)


def _middle_layer(model: nn.Module) -> int:
    return len(decoder_layers(model)) // 2


def make_compliant_pairs(
    model: nn.Module,
    formatter: ChatFormatter,
    harmful_prompts: Sequence[str],
    directions: DirectionSet,
    *,
    layer: int | None = None,
    coeff: float = -1.0,
    method: SteerMethod = "add",
    max_new_tokens: int = 64,
    limit: int | None = None,
    judge: Callable[[Sequence[str], Sequence[str]], list[bool]] | None = None,
    batch_size: int = 8,
    progress: bool | str | None = None,
) -> CompliantPairs:
    """Compliant answers to harmful prompts, written by the model steered against refusal.

    This is this project's own choice: the paper's materials do not say how its fine-tuning
    attack data were made. Writing them with the model itself keeps the answers in the model's
    own style, so that fine-tuning teaches acceptance rather than a new voice. Answers that the
    judge still calls refusals are dropped (kept in ``rejected`` for inspection).

    Args:
        layer: decoder layer whose input is steered (``method="add"``) or whose refusal
            direction is ablated at every layer (``method="ablate"``); default the middle one.
        coeff: strength of the addition (negative steers away from refusal); unused by ablate.
        method: ``"add"`` adds ``coeff * v_refuse`` at one layer, ``"ablate"`` removes the
            refusal direction from every layer's input; both act on prompt and generated tokens.
        limit: stop once this many compliant pairs exist (prompts are tried in order).
        judge: ``(prompts, replies) -> refused flags``; default the paper's keyword judge.

    Example:
        >>> got = make_compliant_pairs(model, fmt, advbench[:50], ds, layer=12, coeff=-1.0)
        >>> len(got.pairs), got.pairs[0].answer[:40]
    """
    from .interventions import ablate, steer

    if method not in ("add", "ablate"):
        raise ValueError(f"unknown steering method {method!r}: use 'add' or 'ablate'")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be at least 0, got {limit}")
    layer = _middle_layer(model) if layer is None else layer
    judge = judge or KeywordRefusalJudge()
    # pyvene freezes every parameter of a model it wraps and calls eval(): undo both after
    flags, was_training = [p.requires_grad for p in model.parameters()], model.training
    try:
        if method == "add":
            steering = steer(model, directions, direction="refusal", layer=layer, coeff=coeff,
                             positions="all_prompt", generated=True)
        else:
            steering = ablate(model, directions, direction="refusal", layers=None, source_layer=layer,
                              positions="all_prompt", generated=True)
        pairs: list[TrainingPair] = []
        rejected: list[TrainingPair] = []
        prompts = list(harmful_prompts)
        start = 0
        while start < len(prompts) and (limit is None or len(pairs) < limit):
            # generate only about as many as are still needed, in whole batches
            size = len(prompts) if limit is None else max(batch_size, limit - len(pairs))
            chunk = prompts[start:start + size]
            start += len(chunk)
            replies = generate_replies(model, formatter, chunk, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, steer=steering, progress=progress)
            for prompt, reply, refused in zip(chunk, replies, judge(chunk, replies)):
                (rejected if refused else pairs).append(TrainingPair(prompt, reply))
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if limit is not None:
        pairs = pairs[:limit]
    return CompliantPairs(pairs=pairs, rejected=rejected)


def answer_eos_id(model: nn.Module, tokenizer) -> int:
    """The token that ends an answer: the tokenizer's eos if the model stops on it."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and (not stops or tokenizer.eos_token_id in stops):
        return int(tokenizer.eos_token_id)
    if stops:
        return int(stops[0])
    raise ValueError("neither the tokenizer nor the model's generation config names an eos token: "
                     "pass eos_token_id=")


def training_batch(formatter: ChatFormatter, pairs: Sequence[TrainingPair | tuple[str, str]], *,
                   eos_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for causal-LM training.

    Each example is the chat-templated prompt (``formatter.render(prompt).text``) followed by
    the answer and ``eos_token_id``. Labels are ``-100`` on the prompt and on padding, so the
    loss is only on what the model should say, not on the user's words. Prompt and answer are
    tokenised separately so that the boundary cannot shift.
    """
    if len(pairs) == 0:
        raise ValueError("no training pairs: pass at least one (prompt, answer) pair")
    tok = formatter.tokenizer
    rows = []
    for pair in map(TrainingPair.coerce, pairs):
        prompt = tok(formatter.render(pair.prompt).text, add_special_tokens=False)["input_ids"]
        answer = tok(pair.answer, add_special_tokens=False)["input_ids"] + [int(eos_token_id)]
        rows.append((prompt, answer))
    longest = max(len(p) + len(a) for p, a in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else int(eos_token_id)
    input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (prompt, answer) in enumerate(rows):
        ids = torch.tensor(prompt + answer, dtype=torch.long)
        input_ids[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
        labels[i, len(prompt):len(ids)] = ids[len(prompt):]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
