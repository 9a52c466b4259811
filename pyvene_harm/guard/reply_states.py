"""The model's hidden states at the tokens of a reply, read in the conversation that drew it out.

State ``s`` is what decoder layer ``s`` reads (the residual stream entering it; state
``n_layers`` is what the last layer writes), the same numbering as the prompt guard. One
:class:`StateTap` serves both uses:

* **fitting and scoring a finished reply** (:func:`reply_token_states`): one forward over the
  rendered prompt followed by the reply's tokens, the states at the reply's positions kept;
* **streaming** (:class:`~pyvene_harm.guard.reply.ReplyStream`): the same hooks on the decoding
  forward, which sees each new token once, so the reply is judged from states the model computes
  anyway, with no second forward.

A reply's text is tokenised as text: control-token strings inside it stay text, as a client's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..decoder_depth import decoder_of, layers_to_run, truncated_decoder
from ..progress import progress_bar
from ..pyvene_support import decoder_layers

__all__ = ["StateTap", "encode_reply", "reply_token_states"]


class StateTap:
    """Forward hooks that keep the states ``states`` of the latest forward (``[b, t, S, d]``).

    Use as a context manager around any forward of ``model`` (a prefill, a decoding step, a
    ``generate`` call): after each forward, :attr:`last` holds that forward's states for every
    position it ran.
    """

    def __init__(self, model: nn.Module, states: Sequence[int]) -> None:
        self.decoder = decoder_of(model)
        self.layers = decoder_layers(self.decoder)
        self.n_layers = getattr(model, "pyvene_harm_num_layers", len(self.layers))
        self.states = tuple(int(s) for s in states)
        if not self.states:
            raise ValueError("a state tap needs at least one state to read")
        bad = [s for s in self.states if not 0 <= s <= len(self.layers)]
        if bad:
            raise ValueError(f"states {bad} are outside 0-{len(self.layers)} (this model runs {len(self.layers)} "
                             "layers): pass states the model has")
        self._handles: list[Any] = []
        self._parts: dict[int, torch.Tensor] = {}
        self.last: torch.Tensor | None = None
        """``[b, t, S, d]`` float32 states of the latest forward (``None`` before any)."""

    def _pre(self, s: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._parts[s] = x.detach()
            self._maybe_done()
        return hook

    def _post(self, s: int):
        def hook(module, args, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            self._parts[s] = x.detach()
            self._maybe_done()
        return hook

    def _maybe_done(self) -> None:
        if len(self._parts) == len(self.states):
            self.last = torch.stack([self._parts[s].float() for s in self.states], dim=2)
            self._parts = {}

    def __enter__(self) -> StateTap:
        # state s > 0 is what layer s - 1 writes (the input of layer s), so a run cut after the
        # deepest layer read still fires every hook
        for s in dict.fromkeys(self.states):
            if s == 0:
                h = self.layers[0].register_forward_pre_hook(self._pre(s), with_kwargs=True)
            else:
                h = self.layers[s - 1].register_forward_hook(self._post(s))
            self._handles.append(h)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._parts = {}


def encode_reply(formatter: Any, item: Any, reply: str | Sequence[int]) -> tuple[list[int], int]:
    """``(ids, first)``: the rendered prompt (``item``: an instruction or a conversation, with the
    assistant turn opened) followed by the reply's tokens; ``first`` is the reply's first index.
    ``reply`` is text (tokenised as literal text) or the token ids a decoder wrote."""
    prompt = formatter.tokenize([item])[0].ids
    if isinstance(reply, str):
        tok = formatter.tokenizer
        try:
            ids = tok(reply, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        except TypeError:  # slow tokenizers without split_special_tokens
            ids = tok(reply, add_special_tokens=False)["input_ids"]
    else:
        ids = [int(i) for i in reply]
    if not ids:
        raise ValueError("an empty reply has no tokens to read: judge the prompt instead")
    return list(prompt) + list(ids), len(prompt)


def reply_token_states(model: nn.Module, formatter: Any, items: Sequence[Any], replies: Sequence[Any], *,
                       states: Sequence[int], batch_size: int = 8,
                       progress: bool | str | None = False) -> list[np.ndarray]:
    """``[T_j, S, d]`` float32 states at each of reply ``j``'s ``T_j`` tokens, in order.

    Rows are batched by length (right-padded, so the causal states of real tokens are exactly
    those of an unpadded forward); only the layers the deepest state needs are run. ``progress``:
    a bar counting replies (``None``: when stderr is a terminal; a string labels it).
    """
    if len(items) != len(replies):
        raise ValueError(f"{len(items)} prompts but {len(replies)} replies: pass one reply per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = [encode_reply(formatter, it, r) for it, r in zip(items, replies)]
    device = next(model.parameters()).device
    pad = formatter.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    out: list[np.ndarray | None] = [None] * len(encoded)
    decoder = decoder_of(model)
    n_run = layers_to_run(len(decoder_layers(decoder)), states)
    tap = StateTap(model, states)
    label = progress if isinstance(progress, str) else "reading replies"
    with torch.inference_mode(), truncated_decoder(decoder, n_run) as dec, tap, \
            progress_bar(progress, total=len(order), description=label) as advance:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            longest = max(len(encoded[i][0]) for i in idx)
            ids = torch.full((len(idx), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), longest), dtype=torch.long)
            for j, i in enumerate(idx):
                row = encoded[i][0]
                ids[j, :len(row)] = torch.tensor(row)
                mask[j, :len(row)] = 1
            dec(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            got = tap.last
            for j, i in enumerate(idx):
                row, first = encoded[i]
                out[i] = got[j, first:len(row)].cpu().numpy()
            advance(len(idx))
    return out  # type: ignore[return-value]
