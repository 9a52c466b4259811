"""pyvene intervention classes for the harmfulness and refusal directions.

Each class is a ``pyvene.SourcelessIntervention`` built with ``keep_last_dim=True`` so that it
sees ``[batch, positions, hidden]``. Vectors are stored in float32 and cast to the hidden
state's dtype and device inside ``forward``: under ``device_map="auto"`` a layer may live on any
device, and the model may run in bf16 or fp16.

Runtime values arrive through pyvene's ``intervention_additional_kwargs`` (the same dict goes to
every intervention of an ``IntervenableModel``; a value may be a ``{name: value}`` mapping to
address one intervention by its ``name``):

- ``coeff``: float or ``[batch]`` tensor, overrides a :class:`DirectionAddition`'s strength;
- ``slot_mask``: ``[batch, n_slots]`` 0/1, which gathered slots are real (pyvene needs padded
  location lists; a padded slot must be left unchanged);
- ``prompt_mask``: ``[batch, prompt_len]`` 0/1, for ``unit_locations=None`` generation, where
  the intervention sees the whole prompt once and then one generated token per step: selected
  prompt positions are steered, every generated token is steered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..pyvene_support import as_device_dtype, pv
from .registry import register_intervention

__all__ = ["BELIEF_COLUMNS", "BeliefReadout", "DirectionAddition", "DirectionalAblation"]

BELIEF_COLUMNS = ("projection", "cos_positive", "cos_negative", "delta")
"""Columns of :class:`BeliefReadout`'s scores: projection on the unit direction, cosine to the
positive centroid (harmful / refused), to the negative one (harmless / accepted), and their
difference (the per-layer term of Delta_harmful / Delta_refuse)."""


def _runtime(kwargs: Mapping[str, Any], key: str, name: str) -> Any:
    value = kwargs.get(key)
    if isinstance(value, Mapping):
        value = value.get(name)
    return value


def _position_mask(base: torch.Tensor, kwargs: Mapping[str, Any], name: str) -> torch.Tensor | None:
    """``[batch, n]`` bool of the positions to change, or ``None`` for all of them."""
    slot = _runtime(kwargs, "slot_mask", name)
    if slot is not None:
        if tuple(slot.shape) != tuple(base.shape[:2]):
            raise ValueError(
                f"slot_mask has shape {tuple(slot.shape)} but the intervention gathered "
                f"{tuple(base.shape[:2])} (batch, slots): build it with select_positions() for the same batch"
            )
        return slot.to(base.device) > 0
    prompt = _runtime(kwargs, "prompt_mask", name)
    if prompt is None:
        return None
    prompt = prompt.to(base.device) > 0
    n, s = base.shape[1], prompt.shape[1]
    if n < s:  # a decode step on a KV cache: only generated tokens
        return None
    if n > s:  # a recomputation without cache: prompt, then generated tokens
        extra = torch.ones((prompt.shape[0], n - s), dtype=torch.bool, device=base.device)
        return torch.cat([prompt, extra], dim=1)
    return prompt


def _where(mask: torch.Tensor | None, changed: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return changed if mask is None else torch.where(mask.unsqueeze(-1), changed, base)


def _vector(value: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.numel() == 0:
        raise ValueError(f"{what} must be a 1-D tensor [hidden], got {getattr(value, 'shape', value)!r}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{what} has non-finite values: the directions are broken, extract them again")
    return value.detach().to(device="cpu", dtype=torch.float32).clone()


class _DirectionIntervention(pv.SourcelessIntervention):
    """Shared plumbing: a float32 direction buffer, a name, the artifact protocol."""

    registry_name = ""

    def __init__(self, *, direction: torch.Tensor, name: str = "", **kwargs: Any) -> None:
        kwargs.pop("keep_last_dim", None)
        super().__init__(keep_last_dim=True, **kwargs)
        self.name = name
        self.register_buffer("direction", _vector(direction, "direction"))

    @property
    def hidden_size(self) -> int:
        return int(self.direction.shape[0])

    def artifact_config(self) -> dict[str, Any]:
        return {"name": self.name}

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {"direction": self.direction}

    @classmethod
    def from_artifact(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]):
        return cls(**{k: tensors[k] for k in cls._tensor_names()}, **config)

    @classmethod
    def _tensor_names(cls) -> tuple[str, ...]:
        return ("direction",)


@register_intervention("pyvene_harm.direction_addition")
class DirectionAddition(_DirectionIntervention):
    """``h + coeff * v``: steer along an (unnormalised) direction; ``coeff < 0`` steers away.

    ``coeff`` is a default; a call may override it with ``intervention_additional_kwargs=
    {"coeff": 2.0}`` without rebuilding anything.

    Example:
        >>> add = DirectionAddition(direction=ds.direction("refusal", 9), coeff=1.0)
        >>> im = HarmIntervenableModel([{"layer": 9, "component": "block_input", "intervention": add}], model)
    """

    def __init__(self, *, direction: torch.Tensor, coeff: float = 1.0, name: str = "", **kwargs: Any) -> None:
        super().__init__(direction=direction, name=name, **kwargs)
        self.coeff = float(coeff)

    def forward(self, base, source=None, subspaces=None, **kwargs):
        coeff = _runtime(kwargs, "coeff", self.name)
        coeff = torch.as_tensor(self.coeff if coeff is None else coeff, dtype=torch.float32,
                                device=base.device)
        if coeff.ndim == 1:  # one strength per example
            coeff = coeff[:, None, None]
        delta = as_device_dtype(coeff * self.direction.to(base.device), base)
        return _where(_position_mask(base, kwargs, self.name), base + delta, base)

    def artifact_config(self) -> dict[str, Any]:
        return {**super().artifact_config(), "coeff": self.coeff}

    def __str__(self) -> str:
        return f"DirectionAddition(name={self.name!r}, coeff={self.coeff})"


@register_intervention("pyvene_harm.directional_ablation")
class DirectionalAblation(_DirectionIntervention):
    """``h - (h . v_hat) v_hat``: remove the component along a direction.

    Computed in float32 and cast back, so that bf16 states lose the component as exactly as
    their precision allows. Unselected positions are returned bit-for-bit unchanged; a zero
    direction removes nothing.
    """

    def __init__(self, *, direction: torch.Tensor, name: str = "", **kwargs: Any) -> None:
        super().__init__(direction=direction, name=name, **kwargs)
        # a zero direction is real, not a mistake: at layer 0 the last prompt token's embedding
        # is the same for every prompt, so the refusal direction there is exactly 0
        norm = self.direction.norm()
        self.register_buffer("unit", self.direction / norm if norm > 0 else self.direction.clone())

    def forward(self, base, source=None, subspaces=None, **kwargs):
        unit = self.unit.to(base.device)
        h = base.float()
        ablated = (h - (h @ unit).unsqueeze(-1) * unit).to(base.dtype)
        return _where(_position_mask(base, kwargs, self.name), ablated, base)

    def __str__(self) -> str:
        return f"DirectionalAblation(name={self.name!r})"


@register_intervention("pyvene_harm.belief_readout")
class BeliefReadout(_DirectionIntervention, pv.CollectIntervention):
    """Leaves the stream unchanged and returns per-example belief scores.

    It is also a ``pyvene.CollectIntervention``, which is how pyvene 0.1.8 hands an
    intervention's values back to the caller: ``(_, collected), _ = im(...)`` gives one
    ``[batch, n_slots, 4]`` float32 tensor per read-out, columns :data:`BELIEF_COLUMNS`,
    NaN on padded slots. (pyvene only keeps an ``InterventionOutput``'s latent in an internal
    list, so collection is the supported way out.)
    """

    def __init__(self, *, direction: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 name: str = "", **kwargs: Any) -> None:
        super().__init__(direction=direction, name=name, **kwargs)
        self.register_buffer("positive", _vector(positive, "positive centroid"))
        self.register_buffer("negative", _vector(negative, "negative centroid"))
        if not self.positive.shape == self.negative.shape == self.direction.shape:
            raise ValueError("direction and both centroids must have the same hidden size")
        norm = self.direction.norm()
        self.register_buffer("unit", self.direction / norm if norm > 0 else self.direction.clone())

    @classmethod
    def _tensor_names(cls) -> tuple[str, ...]:
        return ("direction", "positive", "negative")

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {"direction": self.direction, "positive": self.positive, "negative": self.negative}

    def forward(self, base, source=None, subspaces=None, **kwargs):
        h = base.detach().float()
        dev = h.device
        cos = torch.nn.functional.cosine_similarity
        pos = cos(h, self.positive.to(dev).expand_as(h), dim=-1)
        neg = cos(h, self.negative.to(dev).expand_as(h), dim=-1)
        scores = torch.stack([h @ self.unit.to(dev), pos, neg, pos - neg], dim=-1)
        mask = _position_mask(base, kwargs, self.name)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), float("nan"))
        return scores

    def __str__(self) -> str:
        return f"BeliefReadout(name={self.name!r})"
