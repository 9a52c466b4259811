"""Everything this library does to and around pyvene 0.1.8, in one place.

Three fixes (see the project's PYVENE notes):

1. Model families pyvene does not map (qwen3, gemma3, phi3, olmo2, ...) are registered from the
   model's structure - its decoder-layer list - never from its name. Registration is idempotent.
2. pyvene removes *every* forward hook of the wrapped model after each call, including the ones
   transformers installs to collect ``output_hidden_states``. :class:`HarmIntervenableModel`
   removes only pyvene's own hooks.
3. A location given as a bare int or a flat list turns pyvene's ``use_fast`` path on for good,
   after which per-example locations land at example 0's positions. It is switched off again
   after every broadcast.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torch import nn

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints a notice about nnsight
    import pyvene as pv
    from pyvene.models import intervenable_modelcard as _modelcard

__all__ = [
    "HarmIntervenableModel",
    "PoolCollector",
    "ScanCollector",
    "StateCollector",
    "decoder_layers",
    "ensure_pyvene_support",
    "layers_path",
    "pv",
    "supported_architectures",
]

# The qwen2 mapping is the llama-style one (layers[i].self_attn.q_proj, .mlp.act_fn, ...); for
# any other family we keep only the entries whose submodules exist on that model.
_BASE_MODULE_MAPPING = _modelcard.type_to_module_mapping[
    __import__("transformers").Qwen2Model
]
_BASE_DIMENSION_MAPPING = _modelcard.type_to_dimension_mapping[
    __import__("transformers").Qwen2Model
]

_SUPPORTED = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "Olmo2ForCausalLM",
)


def supported_architectures() -> tuple[str, ...]:
    """Architectures tested against plain PyTorch hooks (others with the same layout work too)."""
    return _SUPPORTED


def layers_path(model: nn.Module) -> str:
    """Dotted path of the decoder-layer ``ModuleList``, found by structure.

    Accepts a causal LM (``model.layers``) or a bare decoder (``layers``).
    """
    for path in ("model.layers", "layers", "model.language_model.layers", "transformer.h"):
        mod = _get_path(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList at "
        "model.layers or layers; this architecture is not supported"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (the stack whose inputs are the residual stream)."""
    return _get_path(model, layers_path(model))


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def ensure_pyvene_support(model: nn.Module) -> None:
    """Teach pyvene the component names of ``type(model)`` if it does not know them yet.

    pyvene keys its tables by exact class, so this runs for every model class we wrap;
    classes pyvene already maps are left untouched.
    """
    cls = type(model)
    if cls in _modelcard.type_to_module_mapping:
        return
    prefix = layers_path(model)
    if prefix == "transformer.h":
        raise ValueError(f"{cls.__name__} is not a llama-style decoder and pyvene does not map it")
    layer0 = decoder_layers(model)[0]
    module_mapping = {}
    for component, (template, *rest) in _BASE_MODULE_MAPPING.items():
        sub = template.replace("layers[%s]", "").lstrip(".")
        if sub and _get_path(layer0, sub) is None:
            continue
        module_mapping[component] = (template.replace("layers[%s]", f"{prefix}[%s]"), *rest)
    _modelcard.type_to_module_mapping[cls] = module_mapping
    _modelcard.type_to_dimension_mapping[cls] = dict(_BASE_DIMENSION_MAPPING)
    # pyvene imports these tables by name into other modules; they are the same dict objects
    pv.type_to_module_mapping = _modelcard.type_to_module_mapping
    pv.type_to_dimension_mapping = _modelcard.type_to_dimension_mapping


def _is_pyvene_hook(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or getattr(getattr(fn, "func", None), "__module__", "")
    return bool(module) and module.startswith("pyvene")


class HarmIntervenableModel(pv.IntervenableModel):
    """An ``IntervenableModel`` that leaves other code's hooks alone and never goes "fast".

    Use it exactly like ``pyvene.IntervenableModel``; every builder in this library returns one.
    """

    def __init__(self, config, model, **kwargs) -> None:
        ensure_pyvene_support(model)
        super().__init__(config, model, **kwargs)

    def _remove_forward_hooks(self) -> None:
        for _, module in self.model.named_modules():
            for store in ("_forward_hooks", "_forward_pre_hooks"):
                hooks = getattr(module, store, None)
                if not hooks:
                    continue
                for hook_id in [k for k, fn in hooks.items() if _is_pyvene_hook(fn)]:
                    hooks.pop(hook_id)
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(hook_id, None)

    def _broadcast_unit_locations(self, batch_size, unit_locations):
        try:
            return super()._broadcast_unit_locations(batch_size, unit_locations)
        finally:
            # the broadcast above already expanded scalars to per-example lists, so the slow
            # path computes the same thing; leaving use_fast on would corrupt later calls
            self.use_fast = False
            for intervention in self.interventions.values():
                if hasattr(intervention, "use_fast"):
                    intervention.use_fast = False


class StateCollector(pv.CollectIntervention):
    """pyvene's CollectIntervention that keeps the position axis.

    pyvene's own flattens ``[batch, positions, d]`` to ``[batch, positions * d]`` and then keeps
    only the first ``d`` columns, so with several positions it silently returns the first
    position's state cut into pieces. This one returns ``[batch, positions, d]`` intact.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.pop("keep_last_dim", None)
        super().__init__(**kwargs, keep_last_dim=True)

    def forward(self, base, source=None, subspaces=None, **kwargs):
        return base.detach()

    def __str__(self) -> str:
        return "StateCollector()"


class PoolCollector(pv.CollectIntervention):
    """Collects weighted sums of the states at its positions: ``[batch, reads, d]``.

    Each read is a row of ``pool_weights`` ``[batch, reads, positions]`` (passed at call time
    through ``intervention_additional_kwargs``), so a mean over an instruction of any length,
    the last few tokens or one position all come back in one small tensor, and a long prompt
    never has its whole ``[positions, d]`` block kept after the layer has run. The sum is
    taken in float32 whatever the model's dtype: a one-hot row returns its state exactly.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.pop("keep_last_dim", None)
        super().__init__(**kwargs, keep_last_dim=True)

    def forward(self, base, source=None, subspaces=None, pool_weights=None, **kwargs):
        if pool_weights is None:
            raise ValueError("PoolCollector needs pool_weights [batch, reads, positions] at call time")
        w = pool_weights.to(device=base.device, dtype=torch.float32)
        # columns no read uses (left padding) may hold anything, even NaN: 0 * NaN is NaN
        used = (w > 0).any(dim=1)
        x = base.detach().float().masked_fill(~used[..., None], 0.0)
        return torch.einsum("brp,bpd->brd", w, x)

    def __str__(self) -> str:
        return "PoolCollector()"


class ScanCollector(PoolCollector):
    """A :class:`PoolCollector` that also returns the states of every token it is told to keep.

    Besides ``pool_weights`` it takes ``token_mask`` ``[batch, positions]`` (the tokens to keep,
    e.g. an instruction's) and optionally ``project`` ``[d, P]``. Without ``project`` it keeps
    each kept token's state; with it, only the state's projections onto the P vectors, so that
    scoring a linear read-out at every token of a 4,096-token prompt keeps ``[positions, P]``
    numbers instead of ``[positions, d]``. pyvene passes one tensor back, so the result is packed
    as ``[batch, reads * d + positions * (P or d)]``: pooled reads first, then the tokens
    (:func:`~pyvene_harm.collect.unpack_scan` splits it).
    """

    def forward(self, base, source=None, subspaces=None, pool_weights=None, token_mask=None, project=None,
                **kwargs):
        pooled = super().forward(base, pool_weights=pool_weights)
        if token_mask is None:
            raise ValueError("ScanCollector needs token_mask [batch, positions] at call time")
        keep = token_mask.to(device=base.device, dtype=torch.bool)
        x = base.detach().float().masked_fill(~keep[..., None], 0.0)
        if project is not None:
            x = x @ project.to(device=base.device, dtype=torch.float32)
        return torch.cat([pooled.flatten(1), x.flatten(1)], dim=1)

    def __str__(self) -> str:
        return "ScanCollector()"


def as_device_dtype(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` on ``like``'s device and dtype (hooks may fire on any device under device_map)."""
    if t.device != like.device or t.dtype != like.dtype:
        return t.to(device=like.device, dtype=like.dtype)
    return t
