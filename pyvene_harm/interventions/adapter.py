"""Direction ablation as a LoRA adapter: the same edit, in weights a serving engine loads.

Removing a unit direction ``v`` from the residual stream at every place something writes to it
(the token embedding, each attention block's ``o_proj``, each MLP's ``down_proj``) is a rank-1
edit of those weights, ``W -> W - v (v^T W)``: the weight orthogonalisation of the
refusal-direction literature. Written as a LoRA of rank 1 (``B = -v``, ``A = v^T W``) it leaves
the base weights alone, so one copy of the model serves plain replies and ablated ones side by
side: ``peft`` loads the folder, and so do ``vllm serve --enable-lora --lora-modules`` and
``vllm.LoRARequest``, which batch requests with and without the adapter together.

Two edits are written. With one layer's direction (``layer=L``) the edit is rank 1, as in the
refusal-direction literature. By default every layer's own direction is kept out of what that
layer reads: layer ``l``'s writes lose the span of the directions of layers ``l + 1`` and later
(rank up to the number of layers), the weight form of ablating each layer's direction at its
input. On the demo model the second undoes far more over-refusal (docs/serving-with-vllm.md).

vLLM (0.32) takes LoRA weights on attention and MLP projections only, not on the embedding, so by
default the adapter leaves the embedding as it is: the direction is removed from everything the
layers write, and only the token embedding's own component along it stays in the stream.
``embedding=True`` removes that too (the full weight orthogonalisation; ``peft`` loads it).

The edit is exact only where those modules' outputs join the residual stream as they are:
pre-norm decoders (Llama, Mistral, Qwen2/3, Gemma, Phi-3). Gemma 2/3 and OLMo 2 normalise each
block's output before adding it, which no linear edit of ``o_proj`` can undo; they are refused.
The hook-based equivalent is :func:`~.steering.ablate` with ``where="writes"`` (or
``"writes+embedding"``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..directions import DirectionSet, library_versions, model_provenance
from ..io_utils import atomic_save_tensors, atomic_write_json
from ..pyvene_support import _get_path, decoder_layers, layers_path

__all__ = ["ADAPTER_CONFIG", "ADAPTER_TENSORS", "ablation_adapter_tensors", "check_residual_writers",
           "export_ablation_adapter", "per_layer_adapter_tensors", "residual_writers"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TENSORS = "adapter_model.safetensors"
LAYER_TARGETS = ("o_proj", "down_proj")
# every module whose output is added to the residual stream, relative to one decoder layer
_LAYER_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def check_residual_writers(model: nn.Module) -> None:
    """A clear error unless ablating at ``o_proj``/``down_proj`` outputs removes a direction exactly."""
    layer0 = decoder_layers(model)[0]
    if hasattr(layer0, "post_feedforward_layernorm"):
        raise ValueError(
            f"{type(model).__name__} normalises each block's output before adding it to the residual stream, "
            "so no edit of o_proj/down_proj removes a direction from it: ablate with hooks instead "
            "(ablate(..., where='block_input'), which the server uses without --adapter)")
    for name, module in residual_writers(model):
        expected = nn.Embedding if name.endswith("embed_tokens") else nn.Linear
        if not isinstance(module, expected):
            raise ValueError(f"{name} is a {type(module).__name__}, not an {expected.__name__}: "
                             "this model's weights cannot carry a LoRA edit (quantised or fused?)")


def residual_writers(model: nn.Module, *, embedding: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``(dotted name, module)`` of the embedding (unless ``embedding=False``) and each layer's
    ``o_proj`` and ``down_proj``."""
    prefix = layers_path(model)
    embed_name = prefix.rsplit(".", 1)[0] + ".embed_tokens" if "." in prefix else "embed_tokens"
    embed = _get_path(model, embed_name)
    if embed is None:
        raise ValueError(f"cannot find the token embedding of {type(model).__name__} at {embed_name}")
    if embedding:
        yield embed_name, embed
    for i, layer in enumerate(decoder_layers(model)):
        for sub in _LAYER_WRITERS:
            module = _get_path(layer, sub)
            if module is None:
                raise ValueError(f"decoder layer {i} of {type(model).__name__} has no {sub}: "
                                 "this architecture's residual writers are not known")
            yield f"{prefix}.{i}.{sub}", module


def ablation_adapter_tensors(model: nn.Module, direction: torch.Tensor, *,
                             embedding: bool = False) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors (rank 1, scaling 1) that remove ``direction`` wherever the stream is written.

    Computed in float32 from the model's weights; keys are the ones ``peft`` saves
    (``base_model.model.<module>.lora_A.weight``, ``...lora_embedding_A`` for the embedding).
    """
    check_residual_writers(model)
    v = _unit(direction)
    if v is None:
        raise ValueError("the direction is zero or not finite: pick a layer whose direction is not 0 "
                         "(layer 0's refusal direction is 0 at the last prompt token)")
    return _lora_tensors(model, lambda layer: v.unsqueeze(1), 1, embedding)


def per_layer_adapter_tensors(model: nn.Module, directions: torch.Tensor, *,
                              embedding: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """LoRA tensors that keep every layer's own direction out of what that layer reads.

    ``directions[k]`` is the direction at the input of layer ``k``. What layer ``l`` writes only
    reaches the inputs of layers ``l + 1`` and later, so its ``o_proj`` and ``down_proj`` lose the
    span of ``directions[l + 1:]`` (the embedding, the span of all of them): the input of every
    layer ``k`` then has no component along ``directions[k]``. The weight form of ablating each
    layer's own direction at its input; the rank is the span's, at most the number of layers
    (zero-padded to one rank for all modules, which peft and vLLM need). Returns ``(tensors, rank)``.
    """
    check_residual_writers(model)
    n = len(decoder_layers(model))
    if directions.shape[0] < n:
        raise ValueError(f"{directions.shape[0]} directions for {n} layers: use directions made from this model")
    units = [_unit(directions[k]) for k in range(n)]

    def basis(layer: int) -> torch.Tensor:  # layer -1: the embedding
        vs = [u for u in units[layer + 1:] if u is not None]
        return _orthonormal(torch.stack(vs)) if vs else torch.zeros(directions.shape[1], 0)

    bases = {layer: basis(layer) for layer in range(-1 if embedding else 0, n)}  # each span once
    rank = max(q.shape[1] for q in bases.values())
    if rank == 0:
        raise ValueError("every direction is zero: nothing to remove")
    return _lora_tensors(model, bases.__getitem__, rank, embedding), rank


def _unit(v: torch.Tensor) -> torch.Tensor | None:
    v = v.detach().to(torch.float32).cpu().flatten()
    norm = v.norm()
    return None if not torch.isfinite(norm) or norm == 0 else v / norm


def _orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """``[d, r]`` orthonormal columns spanning the rows of ``vectors`` (near-parallel ones merged)."""
    q, r = torch.linalg.qr(vectors.T.double())
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q[:, keep].float()


def _lora_tensors(model: nn.Module, basis_of, rank: int, embedding: bool) -> dict[str, torch.Tensor]:
    """``W -> (I - Q Q^T) W`` for each writer, ``Q = basis_of(layer)`` (``[d, r_i]``, orthonormal),
    as LoRA ``B = -Q``, ``A = Q^T W``, zero-padded to ``rank`` columns."""
    out: dict[str, torch.Tensor] = {}
    hidden = None
    for name, module, layer in _writers(model, embedding):
        q = basis_of(layer)
        hidden = q.shape[0]
        weight = module.weight.detach().to(torch.float32).cpu()
        key = f"base_model.model.{name}"
        pad = torch.zeros(hidden, rank)
        pad[:, :q.shape[1]] = q
        if isinstance(module, nn.Embedding):
            # peft: delta[token] = A[:, token]^T B^T, so A = (E Q)^T and B = -Q
            if weight.shape[1] != hidden:
                raise ValueError(f"{name} has width {weight.shape[1]}, the directions {hidden}: "
                                 "use directions made from this model")
            out[f"{key}.lora_embedding_A"] = (weight @ pad).T.contiguous()
            out[f"{key}.lora_embedding_B"] = (-pad).contiguous()
            continue
        if weight.shape[0] != hidden:
            raise ValueError(f"{name} writes {weight.shape[0]} values, the directions have {hidden}: "
                             "use directions made from this model")
        bias = getattr(module, "bias", None)
        if bias is not None and float((bias.detach().float().cpu() @ pad).abs().max()) > 1e-6 * float(bias.norm() + 1):
            raise ValueError(f"{name} has a bias along the direction, which a LoRA cannot edit: "
                             "ablate with hooks instead")
        out[f"{key}.lora_A.weight"] = (pad.T @ weight).contiguous()
        out[f"{key}.lora_B.weight"] = (-pad).contiguous()
    return out


def _writers(model: nn.Module, embedding: bool) -> Iterator[tuple[str, nn.Module, int]]:
    """:func:`residual_writers` with each one's layer (-1 for the embedding)."""
    for name, module in residual_writers(model, embedding=embedding):
        parts = name.split(".")
        yield name, module, (int(parts[-3]) if parts[-1] in LAYER_TARGETS else -1)


def _adapter_config(base: str, embedding: bool, rank: int = 1) -> dict[str, Any]:
    # what peft's LoraConfig writes, with the fields vLLM reads; alpha = rank: scaling 1
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["embed_tokens", *LAYER_TARGETS] if embedding else list(LAYER_TARGETS), "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def export_ablation_adapter(model: nn.Module, directions: DirectionSet, directory: str | os.PathLike, *,
                            layer: int | None, direction: str = "refusal", embedding: bool = False,
                            base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA folder that removes a direction from the residual stream.

    Args:
        model: the model the directions were made from (its weights go into ``A``).
        directions: a :class:`DirectionSet` of this model.
        directory: the folder to write; written beside itself first and renamed, so a folder that
            exists is always whole. An existing adapter folder is replaced.
        layer: whose direction to remove (everywhere, as ``ablate(..., source_layer=layer)``, rank
            1); ``None``: every layer's own direction kept out of what that layer reads
            (:func:`per_layer_adapter_tensors`, rank up to the number of layers).
        embedding: also edit the token embedding (exact weight orthogonalisation; vLLM 0.32 does
            not load LoRA weights on the embedding, ``peft`` does).
        base_model_name_or_path: recorded for ``peft``/vLLM; default: the model's name.

    Returns:
        the folder, with ``adapter_config.json``, ``adapter_model.safetensors`` and
        ``pyvene_harm.json`` (which direction, which layer, the model and the versions).
    """
    from .steering import check_directions_fit, check_layer

    check_directions_fit(model, directions)
    if layer is None:
        tensors, rank = per_layer_adapter_tensors(model, getattr(directions, direction), embedding=embedding)
    else:
        check_layer(layer, model)
        tensors, rank = ablation_adapter_tensors(model, directions.direction(direction, layer), embedding=embedding), 1
    provenance = model_provenance(model)
    base = base_model_name_or_path or provenance.get("model_id") or ""
    directory = Path(directory)
    if directory.exists() and not (directory / ADAPTER_CONFIG).is_file():
        raise FileExistsError(f"{directory} exists and is not an adapter folder: choose a new path")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        atomic_save_tensors(staging / ADAPTER_TENSORS, tensors)
        atomic_write_json(staging / "pyvene_harm.json", {
            "kind": "ablation_adapter", "direction": direction, "source_layer": layer,
            "directions_model_id": directions.metadata.get("model_id"), "model": provenance,
            "embedding": embedding, "rank": rank,
            "modules": [name for name, _ in residual_writers(model, embedding=embedding)], "versions": library_versions()})
        atomic_write_json(staging / ADAPTER_CONFIG, _adapter_config(base, embedding, rank))
        staging.chmod(0o755)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "adapter")
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


class AdapterSteering:
    """An ablation adapter applied in this process with ``peft``, only while replies are written.

    The same folder a serving engine loads (written to a temporary directory), wrapped around
    ``model`` and switched off at once: the guard keeps scoring the plain model, and
    :meth:`generate_batch` (the hook :func:`~pyvene_harm.generation.generate_replies` and
    ``guarded_generate`` call) switches it on for one ``generate``. Args as
    :func:`export_ablation_adapter`.
    """

    def __init__(self, model: nn.Module, directions: DirectionSet, *, layer: int | None = None,
                 direction: str = "refusal", embedding: bool = False) -> None:
        import warnings

        from peft import PeftModel

        with tempfile.TemporaryDirectory(prefix="pyvene-harm-adapter-") as tmp:
            export_ablation_adapter(model, directions, Path(tmp) / "adapter", layer=layer, direction=direction,
                                    embedding=embedding)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tied embeddings: peft warns about merging, never done here
                self.peft = PeftModel.from_pretrained(model, str(Path(tmp) / "adapter")).eval()
        self.peft.base_model.disable_adapter_layers()
        self.layer, self.direction = layer, direction

    def generate_batch(self, batch: Any, generation_config: Any, **generate_kwargs: Any) -> torch.Tensor:
        self.peft.base_model.enable_adapter_layers()
        try:
            out = self.peft.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     generation_config=generation_config, **generate_kwargs)
        finally:
            self.peft.base_model.disable_adapter_layers()
        return getattr(out, "sequences", out)
