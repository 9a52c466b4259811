"""Artifacts on the Hugging Face Hub: where a name points, download and upload.

A name that is not a local folder is looked up on the Hub only when it has the form ``org/name``
(:func:`locate_artifact`); the snapshot folder says which commit was loaded.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["describe_location", "hub_download", "hub_upload", "locate_artifact"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def locate_artifact(name_or_path: str | os.PathLike, files: Sequence[str], *, what: str,
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local artifact folder, or the Hub snapshot of an ``org/name`` repo id.

    Only a string of the form ``org/name`` that is not a local folder is looked up on the Hub:
    anything else (``./x``, ``x/y/z``, a bare name, a path object, a file) is a local path gone
    wrong, and a mistyped local path must never quietly become a download of whatever someone
    published under that name. The snapshot folder's name is the commit it resolved to
    (:func:`describe_location`).
    """
    path = Path(name_or_path)
    text = str(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"{text} is a local folder: a revision applies to Hub repos only, drop it")
        return path
    if isinstance(name_or_path, os.PathLike) or path.exists() or not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"{what} folder {text} does not exist: give the folder written by .save() (or the command's --out), "
            "or a Hub repo id of the form org/name")
    try:
        return hub_download(text, files, revision=revision, cache_dir=cache_dir)
    except ValueError as err:
        raise ValueError(f"there is no local {what} folder {text}, and {err}") from None


def describe_location(name_or_path: str | os.PathLike, folder: Path) -> str:
    """``'org/name (Hub, commit abc123...)'`` for a Hub snapshot, else the local path."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    return f"{name_or_path} (Hub, commit {folder.name})"


def hub_download(repo_id: str, files: Sequence[str], *, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch an artifact folder from the Hub (or its local cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(files), revision=revision,
                                      cache_dir=cache_dir))
    except HFValidationError:
        raise ValueError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id") from None
    except LocalEntryNotFoundError:
        raise ValueError(
            f"{repo_id!r} is not a local folder and is not in the Hub cache while offline: "
            "check the path, or go online / unset HF_HUB_OFFLINE"
        ) from None
    except OSError as err:
        raise ValueError(f"could not fetch {repo_id!r} from the Hub: {err}") from None


def hub_upload(save, repo_id: str, *, private: bool | None, token: str | None, commit_message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
