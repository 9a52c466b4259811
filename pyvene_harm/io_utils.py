"""Atomic writes for every artifact: a reader never sees a half-written file.

torch and safetensors are imported inside the functions that handle tensors: run directories
write their JSON through here, and the CLI must answer ``--help`` without loading torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_save_tensors", "check_finite", "check_tensors_digest",
           "file_sha256", "load_tensors", "read_json"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Sorted, indented JSON (stable diffs), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None) -> None:
    """safetensors file (contiguous CPU tensors, ``format=pt``), written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", **(metadata or {})})
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _default_mode(path: str) -> None:
    """mkstemp creates files readable by their owner only; give them the usual mode instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a corrupted or truncated one is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the artifact folder is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a valid safetensors file ({err}); it may be truncated or corrupted: "
            "save or download the artifact again"
        ) from None


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the artifact folder is incomplete")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {str(err)[:80]}): save or download the "
                         "artifact again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object: save or download the artifact "
                         "again")
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks. Artifact JSON records that of its tensors file (written
    before it), so that a folder whose tensors were replaced without its JSON (an interrupted
    save) is caught on loading; run directories record that of their prompt files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_tensors_digest(folder: Path, tensors_file: str, config_file: str, recorded: Any) -> None:
    """Raise when the tensors file is not the one ``config_file`` was written with."""
    if recorded is None:  # written before digests were recorded
        return
    if not isinstance(recorded, str) or file_sha256(folder / tensors_file) != recorded:
        raise ValueError(f"{folder / tensors_file} is not the file {config_file} was saved with (its sha256 differs: "
                         "an interrupted save or a partial copy): save or download the artifact again")


def check_finite(tensors: Mapping[str, torch.Tensor], where: Any) -> None:
    """Refuse NaN or infinite values, naming the tensor: a NaN centroid makes every cosine NaN,
    and a guard that compares NaN with its threshold says 'harmless' to everything."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: tensor {name!r} holds NaN or infinite values: the artifact is corrupt, "
                             "fit or download it again")


def _jsonable(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # a tensor or dtype can only exist once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path) or (torch is not None and isinstance(obj, torch.dtype)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
