"""The template prefix every prompt of a call starts with, run once and shared by its batches."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .cache_compat import cache_argument, output_cache

__all__ = ["MIN_SHARED_PREFIX", "SharedPrefix"]

# below this many shared tokens, the cache bookkeeping costs more than it saves
MIN_SHARED_PREFIX = 4


def _common_prefix(token_lists: Sequence[Sequence[int]]) -> list[int]:
    first = token_lists[0]
    n = min(len(t) for t in token_lists)
    for ids in token_lists[1:]:
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return list(first[:n])


class SharedPrefix:
    """The template prefix every prompt starts with (system prompt, user header), run once.

    Its key/value cache is copied into each batch, which then runs only the tokens after it:
    with Qwen2.5's default system prompt that is 24 of the ~40 tokens of a typical prompt.
    States after the prefix are the same as in a full run (the cache holds exactly what the
    full run would compute for those tokens), so positions read must lie after it.
    """

    def __init__(self, decoder: nn.Module, ids: Sequence[int], device: torch.device) -> None:
        self.ids = torch.tensor(list(ids), dtype=torch.long)
        self._decoder, self._device = decoder, device
        self._cache_key = cache_argument(decoder)
        self._caches: dict[int, object] = {}  # run lazily: how much can be shared depends on the batch
        self._usable = True

    def _cache(self, n: int):
        """The cache of the first ``n`` prefix tokens (a shorter one is run, not cropped: the
        meaning of ``Cache.crop`` changed between transformers versions)."""
        if n not in self._caches:
            with torch.inference_mode():
                out = self._decoder(input_ids=self.ids[None, :n].to(self._device), use_cache=True)
            self._caches[n] = output_cache(out)
        return self._caches[n]

    @classmethod
    def build(cls, decoder: nn.Module, token_lists: Sequence[Sequence[int]],
              device: torch.device) -> SharedPrefix | None:
        ids = _common_prefix(token_lists)
        return cls(decoder, ids, device) if len(ids) >= MIN_SHARED_PREFIX else None

    def split(self, inputs: dict[str, torch.Tensor], locs: torch.Tensor):
        """``(inputs, locs)`` for the tokens after the prefix, or None when this batch cannot share it.

        The batch is left-padded, so every row ends in the last column; the suffix window is
        the last ``S`` columns, in which tokens of a row's own prefix are masked out.
        """
        ids, mask, pos = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        b, t = ids.shape
        starts = t - mask.sum(dim=1)
        # every position read must come after the prefix
        n = min(len(self.ids), int((locs.min(dim=1).values - starts).min()))
        if n < MIN_SHARED_PREFIX or not self._usable:
            return None
        cols = starts[:, None] + torch.arange(n, device=ids.device)[None]
        if not torch.equal(ids.gather(1, cols), self.ids[:n].to(ids.device)[None].expand(b, n)):
            return None  # tokenised differently in this batch
        width = int((t - starts - n).max())
        col = torch.arange(t - width, t, device=ids.device)
        suffix_mask = mask[:, t - width:] * (col[None] >= (starts + n)[:, None])
        if not hasattr(self._cache(n), "batch_repeat_interleave"):
            self._usable = False  # a cache type that cannot be expanded per batch: run full prompts
            return None
        cache = copy.deepcopy(self._cache(n))  # each forward appends to its cache
        cache.batch_repeat_interleave(b)
        new = {"input_ids": ids[:, t - width:], "position_ids": pos[:, t - width:],
               "attention_mask": torch.cat([torch.ones(b, n, dtype=mask.dtype, device=mask.device), suffix_mask], 1),
               self._cache_key: cache}
        return new, locs - (t - width)
