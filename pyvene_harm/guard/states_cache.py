"""States of prompts kept between fits, so that refitting a guard costs no forward pass.

Mining hard negatives fits a guard, scores a pool of harmless prompts with it and fits again
with the pool's worst false positives added: without a cache the second fit would rerun every
training prompt through the model. A :class:`StatesCache` keeps each prompt's states (float32)
under a key of everything they depend on (the model's provenance, the chat rendering, the reads
and the states), in memory and, given a folder, on disk, so a later ``guard fit`` with the same
model and prompts reuses them too. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..directions import model_provenance
from ..positions import template_hash
from .features import iter_prompt_states

__all__ = ["StatesCache"]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class StatesCache:
    """Prompt -> ``[len(reads) * len(states), d]`` states, for one model and rendering at a time.

    Args:
        directory: where to keep them across runs (one subfolder per model/rendering/reads/states
            key, one safetensors shard per batch of new prompts); None keeps them in memory only.

    Example:
        >>> cache = StatesCache("runs/states")  # doctest: +SKIP
        >>> guard.fit(prompts, labels, states_cache=cache)  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def key(self, model: Any, fmt: Any, reads: Sequence[str], states: Sequence[int]) -> str:
        """What the states depend on, hashed: model, chat rendering, reads, states."""
        prov = model_provenance(model)
        parts = {"model": {k: prov.get(k) for k in ("model_id", "architecture", "hidden_size", "num_layers")},
                 "template": template_hash(getattr(fmt, "template_source", None)),
                 "system": getattr(fmt, "system_prompt", None), "reads": list(reads), "states": list(states),
                 "dtype": str(next(model.parameters()).dtype)}
        return _digest(json.dumps(parts, sort_keys=True, default=str))

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        if key in self._memory:
            return self._memory[key]
        table: dict[str, torch.Tensor] = {}
        folder = None if self.directory is None else self.directory / key
        if folder is not None and folder.is_dir():
            from safetensors.torch import load_file

            for shard in sorted(folder.glob("shard-*.safetensors")):
                t = load_file(shard)
                names = json.loads((shard.with_suffix(".json")).read_text())
                table.update(zip(names, t["x"].unbind(0)))
        self._memory[key] = table
        return table

    flush_every = 512
    """New states are written to disk every this many prompts."""

    def _flush(self, key: str, table: dict[str, torch.Tensor], pending: dict[str, torch.Tensor]) -> None:
        if pending:
            table.update(pending)
            self._store(key, list(pending), torch.stack(list(pending.values())))
            pending.clear()

    def _store(self, key: str, names: list[str], x: torch.Tensor) -> None:
        if self.directory is None or not names:
            return
        from safetensors.torch import save_file

        folder = self.directory / key
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"shard-{len(list(folder.glob('shard-*.safetensors'))):05d}-{_digest(''.join(names))[:8]}"
        tmp = folder / f".{stem}.tmp"
        save_file({"x": x.contiguous()}, str(tmp))
        tmp_names = folder / f".{stem}.json.tmp"
        tmp_names.write_text(json.dumps(names))
        os.replace(tmp_names, folder / f"{stem}.json")  # the names first: a shard is only read with them
        os.replace(tmp, folder / f"{stem}.safetensors")

    def collect(self, model: Any, fmt: Any, prompts: Sequence[Any], states: Sequence[int], reads: Sequence[str], *,
                batch_size: int = 16, progress: bool | str = False) -> torch.Tensor:
        """``[n, len(reads) * len(states), d]`` float64 states of ``prompts``, running only the
        prompts not seen before (instruction strings are cached; conversations always run)."""
        key = self.key(model, fmt, reads, states)
        table = self._load(key)
        ids = [_digest(p) if isinstance(p, str) else None for p in prompts]
        todo = [i for i, k in enumerate(ids) if k is None or k not in table]
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        extra: dict[int, torch.Tensor] = {}
        if todo:
            pending: dict[str, torch.Tensor] = {}
            for idx, x in iter_prompt_states(model, fmt, [prompts[i] for i in todo], states, batch_size=batch_size,
                                             progress=progress, reads=reads):
                for j, row in zip(idx, x.to(torch.float32)):
                    i = todo[j]
                    extra[i] = row
                    if ids[i] is not None:
                        pending[ids[i]] = row
                if len(pending) >= self.flush_every:  # an interrupted run keeps what it computed
                    self._flush(key, table, pending)
            self._flush(key, table, pending)
        return torch.stack([extra[i] if i in extra else table[ids[i]] for i in range(len(prompts))]).to(torch.float64)
