"""Batched greedy generation from chat prompts, optionally through a pyvene model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .data import fingerprint
from .distributed import active, gather_rows
from .positions import ChatFormatter, PromptBatch
from .progress import progress_bar, wanted

__all__ = ["generate_ids", "generate_replies", "greedy_config"]


def greedy_config(model: nn.Module, tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding with the model's own stop tokens; sampling options are not inherited."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                            pad_token_id=pad, num_beams=1)


def generate_replies(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    post_instruction: bool = True,
    wrapper: str | None = None,
    steer: Any | None = None,
    progress: bool | str | None = None,
) -> list[str]:
    """Greedy replies, one per prompt, in prompt order.

    Args:
        steer: optional object with ``generate_batch(batch, generation_config) -> token ids``
            (a :class:`pyvene_harm.interventions.Steering`); plain generation when ``None``.
        progress: a bar counting replies: ``None`` when stderr is a terminal, ``True`` or a
            label always, ``False`` never.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from: pass at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokenizer = formatter.tokenizer
    config = greedy_config(model, tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    # batches of similar length waste less compute on padding
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    dp = active()  # data-parallel: this rank's share of the same batches, then everyone's replies
    mine = batches if dp is None else dp.own(batches)
    replies: list[str] = [""] * len(prompts)
    with progress_bar(progress, total=sum(len(idx) for idx in mine),
                      description=progress if isinstance(progress, str) else "generating") as advance:
        for idx in mine:
            batch = formatter.encode([prompts[i] for i in idx], padding_side="left",
                                     post_instruction=post_instruction, wrapper=wrapper).to(device)
            tick = _Tick(advance, len(idx), max_new_tokens) if wanted(progress) else None
            extra = {"stopping_criteria": StoppingCriteriaList([tick])} if tick is not None else {}
            out = generate_ids(model, batch, config, steer=steer, **extra)
            new = out[:, batch.seq_len:]
            for j, i in enumerate(idx):
                replies[i] = tokenizer.decode(new[j], skip_special_tokens=True).strip()
            if tick is not None:
                tick.finish()
            else:
                advance(len(idx))
    if dp is not None:
        replies = gather_rows({i: replies[i] for idx in mine for i in idx}, len(prompts),
                              key=fingerprint([*prompts, repr((max_new_tokens, batch_size, post_instruction, wrapper))]))
    return replies


class _Tick(StoppingCriteria):
    """Moves the bar a token's share of the batch per decoding step, and never stops anything.

    A batch of 16 replies of 128 tokens takes minutes on a CPU: counted per batch, the bar would
    sit at 0 with no estimate until the whole first batch is done.
    """

    def __init__(self, advance, rows: int, max_new_tokens: int) -> None:
        self.advance, self.rows, self.steps = advance, rows, max_new_tokens
        self.done = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        step = self.rows / self.steps
        if self.done + step < self.rows:
            self.advance(step)
            self.done += step
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        """The rest of the batch's share (replies that all ended before ``max_new_tokens``)."""
        self.advance(self.rows - self.done)
        self.done = float(self.rows)


def generate_ids(model: nn.Module, batch: PromptBatch, config: GenerationConfig, *, steer: Any | None = None,
                 **generate_kwargs: Any) -> torch.Tensor:
    """Token ids (prompt + reply) for one prompt batch, plainly or through ``steer``.

    Args:
        steer: see :func:`generate_replies`.
        generate_kwargs: passed on to ``model.generate`` (e.g. ``stopping_criteria``, to stream
            tokens as they come or stop a reply early).
    """
    with torch.inference_mode():
        if steer is not None:
            return steer.generate_batch(batch, config, **generate_kwargs)
        return model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              generation_config=config, **generate_kwargs)
