"""Intervention artifacts on disk: one sorted JSON config plus one safetensors file.

pyvene's ``IntervenableModel.save`` pickles, drops a ``SourcelessIntervention``'s buffers and
never saves constructor arguments, so artifacts are owned here instead::

    intervention.json          format_version, kind, positions, generated, model provenance,
                               one entry per intervention: registry type, layer, component, config
    intervention.safetensors   "<index>.<tensor name>" -> float32 tensor

The JSON is written last, so its presence means the folder is complete.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..hub import locate_artifact
from ..io_utils import atomic_save_tensors, atomic_write_json, load_tensors, read_json

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "TENSORS_FILE", "read_artifact", "write_artifact"]

FORMAT_VERSION = 1
CONFIG_FILE = "intervention.json"
TENSORS_FILE = "intervention.safetensors"
_KNOWN_KEYS = {"format_version", "kind", "positions", "generated", "direction", "model", "versions",
               "interventions", "metadata"}
_KNOWN_ENTRY_KEYS = {"type", "layer", "component", "config"}


def write_artifact(directory: str | os.PathLike, config: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``tensors`` then ``config`` (with the format version) into ``directory``, atomically."""
    directory = Path(directory)
    atomic_save_tensors(directory / TENSORS_FILE, {k: v.float() for k, v in tensors.items()},
                        metadata={"pyvene_harm_format": str(FORMAT_VERSION)})
    atomic_write_json(directory / CONFIG_FILE, {**config, "format_version": FORMAT_VERSION})
    return directory


def _resolve(name_or_path: str | os.PathLike, revision: str | None,
             cache_dir: str | os.PathLike | None) -> Path:
    return locate_artifact(name_or_path, [CONFIG_FILE, TENSORS_FILE], what="intervention", revision=revision,
                           cache_dir=cache_dir)


def read_artifact(name_or_path: str | os.PathLike, *, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of an artifact in a local folder or a Hub repo.

    Raises ``ValueError`` for a future format version, a corrupted tensor file or missing
    entries; warns (without failing) about keys this version does not know.
    """
    folder = _resolve(name_or_path, revision, cache_dir)
    config = read_json(folder / CONFIG_FILE)
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{folder / CONFIG_FILE} has no valid format_version ({version!r}): it is not "
                         "a pyvene-harm intervention artifact")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{folder} holds intervention format {version}, newer than this library's "
            f"{FORMAT_VERSION}: upgrade with pip install -U pyvene-harm"
        )
    unknown = sorted(set(config) - _KNOWN_KEYS)
    entries = config.get("interventions")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{folder / CONFIG_FILE} lists no interventions: the artifact is incomplete")
    for entry in entries:
        missing = _KNOWN_ENTRY_KEYS - set(entry)
        if missing:
            raise ValueError(f"{folder / CONFIG_FILE}: an intervention entry lacks {sorted(missing)}")
        unknown += [f"interventions[].{k}" for k in sorted(set(entry) - _KNOWN_ENTRY_KEYS)]
    if unknown:
        warnings.warn(f"{folder / CONFIG_FILE} has keys this version ignores: {', '.join(unknown)}",
                      stacklevel=3)
    tensors = load_tensors(folder / TENSORS_FILE)
    return config, tensors
