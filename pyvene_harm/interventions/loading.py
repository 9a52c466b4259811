"""Load a saved :class:`Steering` or :class:`Readout` onto a model, from a folder or the Hub."""

from __future__ import annotations

import os

from torch import nn

from ..directions import model_provenance
from .artifacts import read_artifact
from .readout import Readout
from .registry import intervention_class
from .steering import Site, Steering, check_layer

__all__ = ["load_intervention"]


def load_intervention(name_or_path: str | os.PathLike, model: nn.Module, *, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Steering | Readout:
    """Rebuild a saved intervention on ``model``.

    Args:
        name_or_path: a folder written by ``.save()`` or a Hub repo id written by ``.push_to_hub()``.
        model: the model to attach to; its hidden size and layer count must fit the artifact.

    Example:
        >>> s = steer(model, ds, direction="refusal", layer=11); s.save("refusal-l11")
        >>> s2 = load_intervention("refusal-l11", model)
    """
    config, tensors = read_artifact(name_or_path, revision=revision, cache_dir=cache_dir)
    hidden = model_provenance(model)["hidden_size"]
    sites = []
    for i, entry in enumerate(config["interventions"]):
        cls = intervention_class(entry["type"])
        prefix = f"{i}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        sizes = {int(v.shape[-1]) for v in own.values()}
        if own and sizes != {hidden}:
            raise ValueError(
                f"{name_or_path} holds vectors of size {sorted(sizes)} but this model's hidden size is {hidden}: "
                f"it was saved for {config.get('model', {}).get('model_id', 'another model')!r}"
            )
        check_layer(entry["layer"], model)
        try:
            intervention = cls.from_artifact(entry["config"], own)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{name_or_path}: intervention {i} ({entry['type']}) cannot be rebuilt ({err!r}); "
                             "the artifact is incomplete or from another version: save it again") from None
        sites.append(Site(layer=entry["layer"], component=entry["component"], intervention=intervention))
    kind = config.get("kind")
    if kind == "steering":
        return Steering(model, sites, positions=config["positions"], generated=bool(config.get("generated")),
                        metadata=config.get("metadata"))
    if kind == "readout":
        return Readout(model, sites, positions=config["positions"], metadata=config.get("metadata"))
    raise ValueError(f"{name_or_path}: unknown artifact kind {kind!r}; expected 'steering' or 'readout'")
