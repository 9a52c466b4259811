"""Ready-to-use steering and ablation: one call builds a pyvene model, three generation modes.

:class:`Steering` wraps a :class:`~pyvene_harm.pyvene_support.HarmIntervenableModel` holding
:class:`~.classes.DirectionAddition` or :class:`~.classes.DirectionalAblation` interventions
on the residual stream entering decoder layers (pyvene's ``block_input``), plus the position
selector they apply to. Generation modes:

- ``generated=False``: only the selected prompt positions, through pyvene's ``unit_locations``
  with ``intervene_on_prompt=True`` (generated tokens see the steered cache, as in the paper);
- ``generated=True``: the selected prompt positions *and* every generated token; pyvene has no
  such mode, so the interventions see the whole sequence (``unit_locations=None``) and a
  ``prompt_mask`` says which prompt positions to change. With ``positions="all_prompt"`` this
  is "every prompt and generated position".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from ..directions import DirectionSet, hub_upload, library_versions, model_provenance
from ..positions import PromptBatch
from ..pyvene_support import HarmIntervenableModel, decoder_layers
from .artifacts import write_artifact
from .classes import DirectionAddition, DirectionalAblation
from .selectors import Selector, parse_positions, prompt_mask, select_positions, selector_name

__all__ = ["Site", "Steering", "ablate", "check_directions_fit", "check_layer", "steer"]

COMPONENTS = ("block_input", "block_output", "attention_output", "mlp_output")
# where ablate() removes a direction: entering each layer, or at every write to the stream
ABLATION_SITES = ("block_input", "writes", "writes+embedding")


@dataclass(frozen=True)
class Site:
    """One intervention at one place: ``component`` of decoder layer ``layer``."""

    layer: int
    intervention: nn.Module
    component: str = "block_input"


def check_layer(layer: int, model: nn.Module) -> None:
    """A clear error unless ``layer`` indexes one of ``model``'s decoder layers."""
    n = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer} is out of range: this model has {n} decoder layers (0-{n - 1})")


def check_directions_fit(model: nn.Module, directions: DirectionSet) -> None:
    """A clear error when ``directions`` were made for a model of another shape."""
    directions.check_model(model)
    n = len(decoder_layers(model))
    if directions.n_states < n:
        raise ValueError(
            f"these directions cover {directions.n_states} states but the model has {n} decoder layers: "
            "extract directions for this model"
        )


class InterventionModel:
    """Shared by :class:`Steering` and :class:`~.readout.Readout`: sites, positions, save/load."""

    kind = ""

    def __init__(self, model: nn.Module, sites: Sequence[Site], *, positions: str | Selector,
                 metadata: Mapping[str, Any] | None = None) -> None:
        if not sites:
            raise ValueError("no interventions to apply: pass at least one Site")
        hidden = model_provenance(model)["hidden_size"]
        for site in sites:
            check_layer(site.layer, model)
            if site.component not in COMPONENTS:
                raise ValueError(f"component {site.component!r} is not supported: use one of {COMPONENTS}")
            size = getattr(site.intervention, "hidden_size", None)
            if size is not None and hidden and size != hidden:
                raise ValueError(f"{site.intervention} at layer {site.layer} holds vectors of size {size}, but "
                                 f"this model's hidden size is {hidden}: use directions made from this model")
        self.model = model
        self.sites = tuple(sites)
        self.positions = parse_positions(positions)
        self.metadata = dict(metadata or {})
        self.intervenable = HarmIntervenableModel(
            [{"layer": s.layer, "component": s.component, "intervention": s.intervention} for s in self.sites],
            model,
        )

    @property
    def interventions(self) -> tuple[nn.Module, ...]:
        return tuple(s.intervention for s in self.sites)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.sites)

    def _check_batch(self, batch: PromptBatch) -> None:
        if not isinstance(batch, PromptBatch):
            raise TypeError(f"expected a PromptBatch from ChatFormatter.encode(), got {type(batch).__name__}")

    def _artifact_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "positions": selector_name(self.positions)}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the configuration and vectors (safetensors + JSON); reload with ``load_intervention``."""
        entries, tensors = [], {}
        for i, site in enumerate(self.sites):
            iv = site.intervention
            if not getattr(iv, "registry_name", ""):
                raise ValueError(f"{type(iv).__name__} has no registry name: register it with @register_intervention")
            entries.append({"type": iv.registry_name, "layer": site.layer, "component": site.component,
                            "config": iv.artifact_config()})
            tensors.update({f"{i}.{k}": v for k, v in iv.artifact_tensors().items()})
        config = {**self._artifact_config(), "interventions": entries, "model": model_provenance(self.model),
                  "versions": library_versions(), "metadata": self.metadata}
        return write_artifact(directory, config, tensors)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload pyvene-harm intervention") -> str:
        """Upload the artifact to a Hub model repo (created if needed); returns the commit URL."""
        return hub_upload(self.save, repo_id, private=private, token=token, commit_message=commit_message)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.component}[{s.layer}]: {s.intervention}" for s in self.sites)
        return f"{type(self).__name__}(positions={getattr(self.positions, 'name', self.positions)!r}, {parts})"


class Steering(InterventionModel):
    """Direction addition or ablation inside pyvene, ready for forward and generate.

    Build one with :func:`steer` or :func:`ablate`; ``.intervenable`` is the pyvene model, to
    which other pyvene interventions can be added by building your own ``HarmIntervenableModel``
    from ``.sites``.

    Example:
        >>> s = steer(model, ds, direction="refusal", layer=11, coeff=1.0)
        >>> ids = s.generate_batch(fmt.encode(["Write a poem"]), greedy_config(model, tok, 64), coeff=2.0)
    """

    kind = "steering"

    def __init__(self, model: nn.Module, sites: Sequence[Site], *, positions: str | Selector = "all_prompt",
                 generated: bool = False, metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__(model, sites, positions=positions, metadata=metadata)
        self.generated = bool(generated) or bool(getattr(self.positions, "generated", False))

    @property
    def coeff(self) -> float | None:
        """The additions' default strength (``None`` for pure ablation)."""
        coeffs = [iv.coeff for iv in self.interventions if isinstance(iv, DirectionAddition)]
        return coeffs[0] if coeffs else None

    def set_coeff(self, coeff: float) -> Steering:
        """Change every addition's default strength in place (no rebuilding); returns ``self``."""
        self._additions("set_coeff")
        for iv in self.interventions:
            if isinstance(iv, DirectionAddition):
                iv.coeff = float(coeff)
        return self

    def _additions(self, what: str) -> None:
        if not any(isinstance(iv, DirectionAddition) for iv in self.interventions):
            raise ValueError(f"{what}: this Steering only ablates, it has no strength; build it with steer()")

    def _kwargs(self, coeff: float | torch.Tensor | None, **masks: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = dict(masks)
        if coeff is not None:
            self._additions("coeff")
            out["coeff"] = coeff
        return out

    def forward(self, batch: PromptBatch, *, coeff: float | torch.Tensor | None = None):
        """One steered forward pass over a prompt batch (prompt positions only); HF model output.

        Args:
            batch: from :meth:`ChatFormatter.encode`, left or right padded.
            coeff: strength for this call only (a float, or one per example).
        """
        self._check_batch(batch)
        sel = select_positions(self.positions, batch)
        _, out = self.intervenable(
            batch.model_inputs(), unit_locations=sel.unit_locations(len(self.sites)),
            intervention_additional_kwargs=self._kwargs(coeff, slot_mask=sel.mask.to(batch.input_ids.device)),
        )
        return out

    __call__ = forward

    def generate(self, batch: PromptBatch, generation_config: GenerationConfig, *,
                 coeff: float | torch.Tensor | None = None, **generate_kwargs: Any):
        """Steered ``model.generate``; returns what it returns (ids, or a dict per the config).

        ``generate_kwargs`` go on to ``model.generate`` (e.g. ``stopping_criteria``).
        """
        self._check_batch(batch)
        base = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if self.generated:
            if batch.seq_len < 2:
                raise ValueError("steering generated tokens needs prompts of at least 2 tokens "
                                 "(a 1-token prompt looks like a decode step)")
            mask = prompt_mask(self.positions, batch).to(batch.input_ids.device)
            locations, kwargs = None, self._kwargs(coeff, prompt_mask=mask)
        else:
            sel = select_positions(self.positions, batch)
            locations = sel.unit_locations(len(self.sites))
            kwargs = self._kwargs(coeff, slot_mask=sel.mask.to(batch.input_ids.device))
        _, out = self.intervenable.generate(
            base, unit_locations=locations, intervene_on_prompt=True,
            intervention_additional_kwargs=kwargs, generation_config=generation_config, **generate_kwargs,
        )
        return out

    def generate_batch(self, batch: PromptBatch, generation_config: GenerationConfig, *,
                       coeff: float | torch.Tensor | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """Token ids (prompt + reply), the hook :func:`pyvene_harm.generation.generate_replies` calls."""
        out = self.generate(batch, generation_config, coeff=coeff, **generate_kwargs)
        return getattr(out, "sequences", out)

    def _artifact_config(self) -> dict[str, Any]:
        return {**super()._artifact_config(), "generated": self.generated}


def _direction_sites(model: nn.Module, directions: DirectionSet, direction: str,
                     layers: Sequence[int], make) -> list[Site]:
    check_directions_fit(model, directions)
    for layer in layers:
        check_layer(layer, model)
    return [Site(layer=layer, intervention=make(layer, directions.direction(direction, layer))) for layer in layers]


def steer(model: nn.Module, directions: DirectionSet, *, layer: int, direction: str = "harmfulness",
          coeff: float = 1.0, positions: str | Selector = "all_prompt", generated: bool = False) -> Steering:
    """Add ``coeff *`` a direction to the residual stream entering one decoder layer.

    Args:
        model: the Hugging Face causal LM (not modified; pyvene only adds hooks per call).
        directions: a :class:`DirectionSet` made from this model.
        layer: decoder layer whose input is steered (the paper sweeps it; middle layers work best).
        direction: ``"harmfulness"`` or ``"refusal"``.
        coeff: strength; negative steers away. Per call: ``forward(batch, coeff=...)``.
        positions: a selector or its name (``"all_prompt"``, ``"t_inst+t_post_inst"``, ...).
        generated: also steer every generated token during generation.

    Example:
        >>> s = steer(model, ds, direction="refusal", layer=11)
        >>> generate_replies(model, fmt, ["Write a poem about bread"], steer=s)
    """
    sites = _direction_sites(model, directions, direction, [layer],
                             lambda lay, v: DirectionAddition(direction=v, coeff=coeff, name=f"{direction}.{lay}"))
    meta = {"direction": direction, "directions_model_id": directions.metadata.get("model_id")}
    return Steering(model, sites, positions=positions, generated=generated, metadata=meta)


def ablate(model: nn.Module, directions: DirectionSet, *, direction: str = "refusal",
           layers: int | Sequence[int] | None = None, source_layer: int | None = None,
           positions: str | Selector = "all_prompt", generated: bool = True,
           where: str = "block_input") -> Steering:
    """Remove a direction's component from the residual stream.

    Args:
        layers: where to ablate; ``None`` is every decoder layer.
        source_layer: ablate this one layer's direction everywhere (as in the refusal-direction
            literature); ``None`` ablates each layer's own direction.
        generated: ablate generated tokens too (default: the refusal direction would otherwise
            come back as soon as the reply starts).
        where: ``"block_input"`` removes it from the stream entering each chosen layer;
            ``"writes"`` from what each chosen layer writes to the stream (its attention and
            MLP outputs), so what one layer adds inside itself is removed before its MLP reads
            it; ``"writes+embedding"`` from the token embedding too, so (at every layer, with
            ``source_layer``) no layer ever reads the direction. These two are exactly the LoRA of
            :func:`~.adapter.export_ablation_adapter` without and with ``embedding`` (pre-norm
            decoders only).
    """
    if where not in ABLATION_SITES:
        raise ValueError(f"where={where!r} is not known: use one of {ABLATION_SITES}")
    n = len(decoder_layers(model))
    chosen = list(range(n)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    if not chosen:
        raise ValueError("layers is empty: pass None (every layer) or some layer indices")
    if source_layer is not None:
        check_layer(source_layer, model)
    if where != "block_input":
        from .adapter import check_residual_writers

        check_residual_writers(model)

    def make(lay: int, v: torch.Tensor, tag: str = "") -> DirectionalAblation:
        return DirectionalAblation(direction=v if source_layer is None else directions.direction(direction, source_layer),
                                   name=f"{direction}.{lay}{tag}")

    sites = _direction_sites(model, directions, direction, chosen, make)
    if where != "block_input":
        # the embedding is what enters layer 0; after it, only the two sublayers write
        sites = [s for s in sites if s.layer == 0 and where == "writes+embedding"] + [
            Site(layer=s.layer, component=comp, intervention=make(s.layer, directions.direction(direction, s.layer), f".{comp}"))
            for s in sites for comp in ("attention_output", "mlp_output")]
    meta = {"direction": direction, "source_layer": source_layer, "where": where,
            "directions_model_id": directions.metadata.get("model_id")}
    return Steering(model, sites, positions=positions, generated=generated, metadata=meta)
