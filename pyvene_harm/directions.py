"""DirectionSet: centroids, harmfulness and refusal directions, and where they came from.

The harmfulness direction lives at t_inst (harmful minus harmless centroid), the refusal
direction at t_post_inst (refused minus accepted centroid), one vector per state index
(L layer inputs plus the last layer's output). Directions are differences of means, not
normalised: their norms are reported because they grow with depth.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .collect import ActivationStats
from .hub import hub_download, hub_upload, locate_artifact  # noqa: F401  (hub_download: re-exported)
from .io_utils import (
    atomic_save_tensors,
    atomic_write_json,
    check_finite,
    check_tensors_digest,
    file_sha256,
    load_tensors,
    read_json,
)
from .versions import library_versions

__all__ = [
    "CENTROIDS",
    "DirectionSet",
    "DirectionSetMismatch",
    "FORMAT_VERSION",
    "library_versions",
    "model_provenance",
]

FORMAT_VERSION = 1
TENSORS_FILE = "directions.safetensors"
CONFIG_FILE = "directions.json"
KINDS = ("harmfulness", "refusal")
# centroid name -> (position it is read at, role)
CENTROIDS = {
    "harmful": "t_inst",
    "harmless": "t_inst",
    "refused": "t_post_inst",
    "accepted": "t_post_inst",
}


class DirectionSetMismatch(ValueError):
    """A DirectionSet was applied to a model it was not made from."""


def model_provenance(model: nn.Module, formatter=None) -> dict[str, Any]:
    """What a model-specific artifact must match: id, architecture, sizes, chat template."""
    from .positions import template_hash
    from .pyvene_support import decoder_layers

    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return {
        "model_id": getattr(config, "_name_or_path", "") or type(model).__name__,
        "architecture": type(model).__name__,
        "hidden_size": int(getattr(text, "hidden_size", 0) or 0),
        # a scoring-only copy may have dropped the layers it never runs (decoder_depth.drop_unread_layers)
        "num_layers": int(getattr(model, "pyvene_harm_num_layers", 0) or len(decoder_layers(model))),
        "chat_template_hash": template_hash(formatter.template_source) if formatter is not None else None,
    }


@dataclass(frozen=True)
class DirectionSet:
    """Centroids and directions per state index, with provenance.

    ``centroids[name]`` and each direction have shape ``[n_states, hidden]`` (float32), where
    ``n_states = num_layers + 1``. Build one with :meth:`from_stats`, or load with
    :meth:`from_pretrained`.

    Example:
        >>> ds = DirectionSet.from_stats(stats, metadata=model_provenance(model, fmt))
        >>> ds.harmfulness[9], ds.cosine()
        >>> ds.save("my-directions")
    """

    centroids: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    # --- construction ------------------------------------------------------------------

    @classmethod
    def from_stats(
        cls,
        stats: ActivationStats,
        *,
        harmful: Sequence[str] | str = "harmful",
        harmless: Sequence[str] | str = "harmless",
        refused: Sequence[str] | str | None = None,
        accepted: Sequence[str] | str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> DirectionSet:
        """Centroids from collected statistics.

        Each role names one or more groups of ``stats``; several groups are pooled with their
        counts as weights. By default the refusal roles reuse the harmfulness roles (harmful
        prompts the model refused vs harmless ones it accepted, as in the paper).
        """
        roles = {
            "harmful": harmful,
            "harmless": harmless,
            "refused": harmful if refused is None else refused,
            "accepted": harmless if accepted is None else accepted,
        }
        centroids, sizes = {}, {}
        for role, groups in roles.items():
            names = [groups] if isinstance(groups, str) else list(groups)
            missing = [g for g in names if g not in stats.counts or stats.counts[g] == 0]
            if missing:
                raise ValueError(
                    f"no prompts in group {missing[0]!r} for the {role} centroid; groups with prompts: "
                    f"{[g for g in stats.groups if stats.counts[g]]}"
                )
            pos = CENTROIDS[role]
            total = sum(stats.sums[g][pos] for g in names)
            n = sum(stats.counts[g] for g in names)
            centroids[role] = (total / n).to(torch.float32)
            sizes[role] = n
        meta = {
            "format_version": FORMAT_VERSION,
            "component": "block_input (layers 0..L-1) + block_output (layer L-1)",
            "positions": dict(CENTROIDS),
            "group_sizes": sizes,
            "groups": {r: ([g] if isinstance(g, str) else list(g)) for r, g in roles.items()},
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(metadata or {}),
        }
        return cls(centroids=centroids, metadata=meta)

    # --- views -------------------------------------------------------------------------

    @property
    def n_states(self) -> int:
        return int(next(iter(self.centroids.values())).shape[0])

    @property
    def num_layers(self) -> int:
        return self.n_states - 1

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.centroids.values())).shape[1])

    @property
    def harmfulness(self) -> torch.Tensor:
        """``[n_states, hidden]``: mean(harmful) - mean(harmless) at t_inst."""
        return self.centroids["harmful"] - self.centroids["harmless"]

    @property
    def refusal(self) -> torch.Tensor:
        """``[n_states, hidden]``: mean(refused) - mean(accepted) at t_post_inst."""
        return self.centroids["refused"] - self.centroids["accepted"]

    def direction(self, kind: str, layer: int | None = None) -> torch.Tensor:
        """One direction (``"harmfulness"`` or ``"refusal"``), all layers or one."""
        if kind not in KINDS:
            raise ValueError(f"unknown direction {kind!r}: choose one of {', '.join(KINDS)}")
        v = self.harmfulness if kind == "harmfulness" else self.refusal
        if layer is None:
            return v
        self.check_layer(layer)
        return v[layer]

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_states:
            raise ValueError(
                f"layer {layer} is out of range: these directions have {self.n_states} states "
                f"(0-{self.n_states - 1}; {self.num_layers} decoder layers plus the last output)"
            )

    def norms(self) -> dict[str, torch.Tensor]:
        """Per-layer norms of both directions."""
        return {k: self.direction(k).norm(dim=-1) for k in KINDS}

    def cosine(self) -> torch.Tensor:
        """Per-layer cosine between the harmfulness and the refusal direction."""
        return torch.nn.functional.cosine_similarity(self.harmfulness, self.refusal, dim=-1)

    def summary(self) -> list[dict[str, float]]:
        """One row per state index: norms and cosine (for tables and reports)."""
        norms, cos = self.norms(), self.cosine()
        return [
            {"layer": i, "harmfulness_norm": float(norms["harmfulness"][i]),
             "refusal_norm": float(norms["refusal"][i]), "cosine": float(cos[i])}
            for i in range(self.n_states)
        ]

    def to(self, device=None, dtype=None) -> DirectionSet:
        return replace(self, centroids={k: v.to(device=device, dtype=dtype) for k, v in self.centroids.items()})

    # --- compatibility -----------------------------------------------------------------

    def check_model(self, model: nn.Module, formatter=None) -> None:
        """Raise :class:`DirectionSetMismatch` listing every way ``model`` differs."""
        actual = model_provenance(model, formatter)
        diffs = []
        for key in ("architecture", "hidden_size", "num_layers", "chat_template_hash"):
            want, got = self.metadata.get(key), actual.get(key)
            if want is None or got is None:
                continue
            if want != got:
                diffs.append(f"{key}: directions {want!r}, model {got!r}")
        if self.hidden_size != actual["hidden_size"] and not any(d.startswith("hidden_size") for d in diffs):
            diffs.append(f"hidden_size: directions {self.hidden_size}, model {actual['hidden_size']}")
        if diffs:
            raise DirectionSetMismatch(
                f"these directions were made from {self.metadata.get('model_id', 'another model')!r} "
                f"and do not fit this model ({'; '.join(diffs)}): extract directions for this model"
            )

    # --- IO ----------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directions.safetensors`` and ``directions.json`` (atomically)."""
        directory = Path(directory)
        tensors = {f"centroid.{k}": v for k, v in self.centroids.items()}
        tensors["direction.harmfulness"] = self.harmfulness
        tensors["direction.refusal"] = self.refusal
        atomic_save_tensors(directory / TENSORS_FILE, tensors)
        # the JSON goes last: its presence means the folder is complete, its digest that the
        # tensors beside it are the ones it was written with
        atomic_write_json(directory / CONFIG_FILE, {**self.metadata, "format_version": FORMAT_VERSION,
                                                    "tensors_sha256": file_sha256(directory / TENSORS_FILE)})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DirectionSet:
        directory = Path(directory)
        meta = read_json(directory / CONFIG_FILE)
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{directory} holds DirectionSet format {version!r}, newer than this library's "
                f"{FORMAT_VERSION}: upgrade with pip install -U pyvene-harm"
            )
        check_tensors_digest(directory, TENSORS_FILE, CONFIG_FILE, meta.pop("tensors_sha256", None))
        tensors = load_tensors(directory / TENSORS_FILE)
        check_finite(tensors, directory / TENSORS_FILE)
        centroids = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("centroid.")}
        missing = sorted(set(CENTROIDS) - set(centroids))
        if missing:
            raise ValueError(f"{directory / TENSORS_FILE} lacks centroids {missing}: the artifact is incomplete")
        return cls(centroids=centroids, metadata=meta)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None) -> DirectionSet:
        """Load from a local folder or a Hub repo id (honours ``HF_HUB_OFFLINE`` and the cache)."""
        return cls.load(locate_artifact(name_or_path, [CONFIG_FILE, TENSORS_FILE], what="DirectionSet",
                                        revision=revision, cache_dir=cache_dir))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload pyvene-harm DirectionSet") -> str:
        """Upload to a Hub model repo (created if needed); returns the commit URL."""
        return hub_upload(self.save, repo_id, private=private, token=token, commit_message=commit_message)
