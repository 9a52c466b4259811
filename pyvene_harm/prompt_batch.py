"""A prompt as the model reads it: its rendered text, its token ids, and a padded batch of them,
each with its chat positions (t_inst, t_post_inst, the instruction's first token).

:class:`~pyvene_harm.positions.ChatFormatter` makes them; everything that runs a forward pass
reads positions from them, so they are plain frozen records with no tokenizer attached.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["EncodedPrompt", "PromptBatch", "RenderedPrompt"]


@dataclass(frozen=True)
class RenderedPrompt:
    """One prompt as text, with the character span of the instruction inside it."""

    text: str
    inst_start: int
    inst_end: int
    inner_end: int
    """End of the wrapped instruction when a wrapper (a question after it) was applied."""
    client: tuple[tuple[int, int], ...] = ()
    """Character spans of text the client wrote (instruction, messages, system prompt): read
    as plain text whatever control-token strings it holds."""


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's token ids (unpadded) and its positions, indices into ``ids``.

    What :meth:`ChatFormatter.tokenize` returns: tokenise once, then :meth:`ChatFormatter.collate`
    any subset into a padded :class:`PromptBatch` (e.g. batches of similar length).
    """

    ids: list[int]
    inst_start: int
    t_inst: int
    inner_end: int

    @property
    def t_post_inst(self) -> int:
        return len(self.ids) - 1


@dataclass(frozen=True)
class PromptBatch:
    """Token ids of a batch of chat prompts with each example's own positions.

    All index tensors have shape ``[batch]`` and index into the padded sequence, so they
    are correct whatever the padding side.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    t_inst: torch.Tensor
    """Last token of the user's instruction (of the whole user message)."""
    t_post_inst: torch.Tensor
    """Last prompt token (the last post-instruction token); equals t_inst without them."""
    inst_start: torch.Tensor
    """First token of the instruction."""
    prompt_start: torch.Tensor
    """First non-pad token."""
    inner_end: torch.Tensor
    """Last token of the wrapped instruction (before an appended question); else t_inst."""
    padding_side: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_post_inst(self) -> torch.Tensor:
        """Number of post-instruction tokens per example."""
        return self.t_post_inst - self.t_inst

    def to(self, device: torch.device | str) -> PromptBatch:
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return PromptBatch(**values)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a Hugging Face forward call.

        Position ids come from the attention mask so that a left-padded batch computes
        exactly what each example computes alone.
        """
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }
