"""A Latent Guard on disk: ``guard.safetensors`` + ``guard.json``, in the DirectionSet style.

Tensors (the centroids) go to safetensors, everything else to sorted, indented JSON with a
format version and the provenance of the model the guard was fitted on (model id,
architecture, hidden size, layer count, chat-template hash). Both files are written atomically
and the JSON last, so its presence means the folder is complete. Nothing is pickled.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ..directions import CONFIG_FILE as DIRECTIONS_CONFIG
from ..directions import library_versions
from ..hub import locate_artifact
from ..io_utils import (
    atomic_save_tensors,
    atomic_write_json,
    check_finite,
    check_tensors_digest,
    file_sha256,
    load_tensors,
    read_json,
)
from .features import PROVENANCE_KEYS, check_fits_model, resolve_states

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "GuardArtifactMixin", "NOT_FITTED", "TENSORS_FILE", "load_guard",
           "locate", "save_guard", "set_fitted"]

FORMAT_VERSION = 2
"""2 added ``method``, ``reads`` and the linear read-out's tensors; format-1 folders (the
paper's centroids at t_inst) load as ``method="paper"``, ``reads=("t_inst",)``."""
CONFIG_FILE = "guard.json"
TENSORS_FILE = "guard.safetensors"
KIND = "LatentGuard"
NOT_FITTED = ("This %(name)s is not fitted yet: call fit(prompts, labels) with labels 1 = harmful, "
              "0 = harmless, or load one with LatentGuard.from_pretrained(folder), before scoring.")
_KNOWN = {
    "format_version", "kind", "states", "layers", "threshold", "classes", "categories", "calibration",
    "selection", "n_train", "fitted_on", "params", "versions", "created", "hidden_size", "model_id",
    "architecture", "num_layers", "chat_template_hash", "data", "system_prompt", "extra",
    "method", "reads", "readout", "tensors_sha256", "sentence_margin",
}
RESERVED_CATEGORIES = ("harmful", "flagged")
"""Names a harm category cannot take: the moderation response already uses them for the verdict."""


class GuardArtifactMixin:
    """Construction from a DirectionSet, and disk / Hub IO, for :class:`LatentGuard`."""

    @classmethod
    def from_directions(cls, directions: Any, model: Any = None, tokenizer: Any = None, *,
                        layers: Sequence[int] | None = None, threshold: float = 0.0,
                        formatter: Any = None, system_prompt: str | None = None,
                        batch_size: int = 16, progress: bool | None = None) -> Any:
        """A fitted guard from a DirectionSet's harmful and harmless centroids.

        Example:
            >>> guard = LatentGuard.from_directions(DirectionSet.load("runs/extract/directions"), model, tok)
        """
        guard = cls(model, tokenizer, layers=layers, threshold=threshold, formatter=formatter,
                    system_prompt=system_prompt, batch_size=batch_size, progress=progress)
        guard._check_params()
        if model is not None:
            has_template = tokenizer is not None or formatter is not None
            directions.check_model(model, guard.chat_formatter() if has_template else None)
        states = resolve_states(layers, directions.n_states)
        c = directions.centroids
        guard.centroids_ = {k: c[k][list(states)].to(torch.float32).numpy() for k in ("harmful", "harmless")}
        sizes = directions.metadata.get("group_sizes", {})
        set_fitted(guard, states=states, reads=("t_inst",), classes=[0, 1],
                   n_train={k: int(sizes.get(k, 0)) for k in ("harmful", "harmless")},
                   metadata={k: directions.metadata.get(k) for k in PROVENANCE_KEYS}, fitted_on="directions")
        return guard

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``guard.safetensors`` + ``guard.json`` (sorted, atomic, format-versioned)."""
        check_is_fitted(self, msg=NOT_FITTED)
        return save_guard(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Any = None, tokenizer: Any = None, *,
             formatter: Any = None, progress: bool | None = None) -> Any:
        """Load a saved guard; with a model, check now that it fits (:class:`GuardMismatch`)."""
        return load_guard(cls, directory, model, tokenizer, formatter=formatter, progress=progress)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, model: Any = None, tokenizer: Any = None, *,
                        formatter: Any = None, progress: bool | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Any:
        """Load from a local folder or a Hub repo id (honours ``HF_HUB_OFFLINE`` and the cache)."""
        folder = locate(name_or_path, revision=revision, cache_dir=cache_dir)
        return cls.load(folder, model, tokenizer, formatter=formatter, progress=progress)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload pyvene-harm LatentGuard") -> str:
        """Upload to a Hub model repo (created if needed); returns the commit URL."""
        from ..directions import hub_upload

        return hub_upload(self.save, repo_id, private=private, token=token, commit_message=commit_message)



def set_fitted(guard: Any, *, states: Sequence[int], reads: Sequence[str], classes: Sequence[Any],
               n_train: Mapping[str, int], metadata: Mapping[str, Any], fitted_on: str,
               categories: Sequence[str] = (), category_centroids: Sequence[np.ndarray] = (),
               layers: Sequence[int] | None = None, threshold: float | None = None,
               calibration: dict | None = None, selection: dict | None = None, readout: Any = None,
               sentence_margin: float = 0.0) -> None:
    """Set every fitted attribute but ``centroids_`` (which the caller has set) in one place,
    so that fit, :meth:`~LatentGuard.from_directions` and loading cannot drift apart."""
    check_category_names(categories)
    h = guard.centroids_["harmful"]
    guard.states_ = tuple(int(s) for s in states)
    guard.reads_ = tuple(str(r) for r in reads)
    guard.readout_ = readout
    guard.classes_ = np.asarray(classes)
    guard.n_train_ = {str(k): int(v) for k, v in n_train.items()}
    guard.metadata_ = dict(metadata)
    guard.fitted_on_ = fitted_on
    guard.categories_ = np.array(list(categories), dtype=object)
    guard.category_centroids_ = (np.stack(list(category_centroids)).astype(np.float32) if len(categories)
                                 else np.zeros((0, *h.shape), np.float32))
    guard.hidden_size_ = int(h.shape[1])
    guard.n_features_in_ = len(guard.reads_) * len(guard.states_) * guard.hidden_size_
    guard.layers_ = tuple(int(x) for x in layers) if layers is not None else guard.states_
    guard.threshold_ = float(guard.threshold if threshold is None else threshold)
    guard.calibration_ = calibration
    guard.selection_ = selection
    guard.refusal_read_ = None  # the model's refusal belief is its own artifact: LatentGuard.set_refusal_read
    if not (isinstance(sentence_margin, (int, float)) and np.isfinite(sentence_margin) and sentence_margin >= 0):
        raise ValueError(f"sentence_margin must be a finite number >= 0, got {sentence_margin!r}: a guard saved with "
                         "another was edited by hand or is corrupt; fit it again")
    guard.sentence_margin_ = float(sentence_margin)  # what a sent:K read's earlier sentence ends clear beyond the threshold


def save_guard(guard: Any, directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    tensors = {f"centroid.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in guard.centroids_.items()}
    for i, c in enumerate(guard.category_centroids_):
        # category names can hold any character: tensors are numbered, names live in the JSON
        tensors[f"category.{i}"] = torch.from_numpy(np.ascontiguousarray(c))
    if guard.readout_ is not None:
        tensors.update(guard.readout_.tensors())
    atomic_save_tensors(directory / TENSORS_FILE, tensors)
    fmt = guard.formatter
    meta = {k: v for k, v in guard.metadata_.items() if k in _KNOWN}
    extra = {k: v for k, v in guard.metadata_.items() if k not in _KNOWN}
    config = {
        **meta,
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "method": "linear" if guard.readout_ is not None else "paper",
        "reads": list(guard.reads_),
        "readout": guard.readout_.config() if guard.readout_ is not None else None,
        "states": list(guard.states_),
        "layers": list(guard.layers_),
        "threshold": guard.threshold_,
        "classes": guard.classes_.tolist(),
        "categories": [str(c) for c in guard.categories_],
        "calibration": guard.calibration_,
        "selection": guard.selection_,
        "n_train": guard.n_train_,
        "fitted_on": guard.fitted_on_,
        "hidden_size": guard.hidden_size_,
        "sentence_margin": guard.sentence_margin_,
        "params": {"layers": list(guard.layers) if guard.layers is not None else None,
                   "method": guard.method, "reads": list(guard.reads), "C": guard.C, "rank": guard.rank,
                   "augment": guard.augment, "Cs": None if guard.Cs is None else [float(c) for c in guard.Cs],
                   "threshold": float(guard.threshold), "batch_size": guard.batch_size,
                   "system_prompt": fmt.system_prompt if fmt is not None else guard.system_prompt,
                   "template": fmt.template_override if fmt is not None else guard.template,
                   "n_states": guard.n_states, "normalize_spelling": bool(guard.normalize_spelling),
                   "scan_negatives": int(guard.scan_negatives), "calibrate_max": bool(guard.calibrate_max),
                   "max_threshold": str(guard.max_threshold), "sentence_budget": guard.sentence_budget},
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        config["extra"] = {**meta.get("extra", {}), **extra}
    config["tensors_sha256"] = file_sha256(directory / TENSORS_FILE)
    atomic_write_json(directory / CONFIG_FILE, config)
    return directory


def load_guard(cls: type, directory: str | os.PathLike, model: Any = None, tokenizer: Any = None, *,
               formatter: Any = None, progress: bool | None = None) -> Any:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() and (directory / DIRECTIONS_CONFIG).is_file():
        raise ValueError(f"{directory} holds a DirectionSet, not a guard: use LatentGuard.from_directions("
                         f"DirectionSet.load({str(directory)!r}), model, tokenizer)")
    if not directory.is_dir():
        raise FileNotFoundError(f"guard folder {directory} does not exist: give the folder written by "
                                "LatentGuard.save or `pyvene-harm guard fit --out`")
    meta = read_json(directory / CONFIG_FILE)
    version = meta.get("format_version")
    if meta.get("kind") != KIND:
        raise ValueError(f"{directory / CONFIG_FILE} is not a LatentGuard (kind {meta.get('kind')!r})")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{directory} holds LatentGuard format {version!r}, newer than this library's "
                         f"{FORMAT_VERSION}: upgrade with pip install -U pyvene-harm")
    unknown = sorted(set(meta) - _KNOWN)
    if unknown:
        warnings.warn(f"{directory / CONFIG_FILE}: ignoring unknown keys {unknown} (written by a newer "
                      "pyvene-harm?)", stacklevel=3)
    absent = [k for k in ("states", "classes") if k not in meta]
    if absent:
        raise ValueError(f"{directory / CONFIG_FILE} lacks {absent}: the artifact is incomplete, save it again")
    check_tensors_digest(directory, TENSORS_FILE, CONFIG_FILE, meta.get("tensors_sha256"))
    tensors = load_tensors(directory / TENSORS_FILE)
    check_finite(tensors, directory / TENSORS_FILE)
    _check_finite_numbers(meta, directory / CONFIG_FILE)
    missing = [k for k in ("centroid.harmful", "centroid.harmless") if k not in tensors]
    names = list(meta.get("categories") or [])
    missing += [f"category.{i}" for i in range(len(names)) if f"category.{i}" not in tensors]
    if missing:
        raise ValueError(f"{directory / TENSORS_FILE} lacks {missing}: the artifact is incomplete, save it again")
    params = dict(meta.get("params") or {})
    spelling = params.get("normalize_spelling", False)  # guards saved before it read text as sent
    if not isinstance(spelling, bool):
        raise ValueError(f"{directory / CONFIG_FILE}: params.normalize_spelling must be true or false, got "
                         f"{spelling!r}: the artifact was edited by hand or is corrupt, save it again")
    method = meta.get("method", "paper")
    reads = tuple(meta.get("reads") or ("t_inst",))
    guard = cls(model, tokenizer, formatter=formatter, progress=progress, method=method,
                reads=tuple(params.get("reads") or reads), C=params.get("C"), rank=params.get("rank", 256),
                augment=bool(params.get("augment", False)), Cs=params.get("Cs"),
                layers=params.get("layers"), threshold=float(params.get("threshold", 0.0)),
                batch_size=int(params.get("batch_size", 16)), system_prompt=params.get("system_prompt"),
                template=params.get("template"),
                n_states=params.get("n_states"), normalize_spelling=spelling,
                scan_negatives=int(params.get("scan_negatives", 2)),
                calibrate_max=bool(params.get("calibrate_max", False)),
                max_threshold=str(params.get("max_threshold", "platt")),
                sentence_budget=params.get("sentence_budget"))
    guard.centroids_ = {k: tensors[f"centroid.{k}"].to(torch.float32).numpy() for k in ("harmful", "harmless")}
    states = meta["states"]
    if guard.centroids_["harmful"].shape[0] != len(states) * len(reads):
        raise ValueError(f"{directory}: {len(states)} states x {len(reads)} reads in {CONFIG_FILE} but centroids "
                         f"for {guard.centroids_['harmful'].shape[0]}: the artifact is inconsistent")
    if method not in ("paper", "linear"):
        raise ValueError(f"{directory / CONFIG_FILE} names method {method!r}, which this library does not know: "
                         "upgrade with pip install -U pyvene-harm")
    readout = None
    if method == "linear":
        from .readout import LinearReadout

        if not isinstance(meta.get("readout"), dict):
            raise ValueError(f"{directory / CONFIG_FILE} is a linear guard without its read-out: save it again")
        readout = LinearReadout.from_tensors(tensors, meta["readout"])
    provenance = {k: v for k, v in meta.items() if k in ("model_id", "architecture", "hidden_size", "num_layers",
                                                          "chat_template_hash", "data", "system_prompt")}
    if meta.get("extra"):
        provenance.update(meta["extra"])
    set_fitted(guard, states=states, reads=reads, classes=meta["classes"], n_train=meta.get("n_train", {}),
               metadata=provenance, fitted_on=meta.get("fitted_on", "prompts"), categories=names,
               category_centroids=[tensors[f"category.{i}"].to(torch.float32).numpy() for i in range(len(names))],
               layers=meta.get("layers"), threshold=meta.get("threshold"), calibration=meta.get("calibration"),
               selection=meta.get("selection"), readout=readout, sentence_margin=meta.get("sentence_margin", 0.0))
    if model is not None:
        fmt = guard.chat_formatter() if (tokenizer is not None or formatter is not None) else None
        check_fits_model(guard.metadata_, guard.hidden_size_, guard.layers_, model, fmt)
    return guard


def _check_finite_numbers(meta: Mapping[str, Any], where: Path) -> None:
    """The numbers that decide a verdict must be finite: a threshold of Infinity, or a NaN one,
    would let every prompt through. JSON readers accept ``NaN`` and ``Infinity``; this does not."""
    fields = {"threshold": meta.get("threshold"), "params.threshold": (meta.get("params") or {}).get("threshold"),
              "sentence_margin": meta.get("sentence_margin")}
    for k, v in (meta.get("calibration") or {}).items():
        fields[f"calibration.{k}"] = v
    for name, v in fields.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"{where}: {name} is {v!r}, not a finite number: the artifact is corrupt or was edited; "
                             "fit the guard again or restore its guard.json")


def check_category_names(names: Sequence[str]) -> None:
    """Refuse category names the moderation response uses for the verdict itself."""
    clash = sorted({str(n) for n in names} & set(RESERVED_CATEGORIES))
    if clash:
        raise ValueError(f"category names {clash} collide with the moderation verdict's own fields: rename them "
                         f"(e.g. '{clash[0]}_content')")


def locate(name_or_path: str | os.PathLike, *, revision: str | None = None,
           cache_dir: str | os.PathLike | None = None) -> Path:
    """A local guard folder, or the Hub snapshot of an ``org/name`` repo id (never a Hub lookup
    for a path that merely does not exist: :func:`~pyvene_harm.hub.locate_artifact`)."""
    return locate_artifact(name_or_path, [CONFIG_FILE, TENSORS_FILE], what="guard", revision=revision,
                           cache_dir=cache_dir)
