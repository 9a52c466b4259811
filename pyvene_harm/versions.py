"""The versions every artifact and run directory records, read from package metadata only.

Its own module (no torch), so that a run directory can record them before anything heavy is
imported: a recipe refuses a conflicting run directory without loading torch.
"""

from __future__ import annotations

from importlib import metadata as importlib_metadata

__all__ = ["library_versions"]


def library_versions() -> dict[str, str]:
    """Installed versions of this package and of what its numbers depend on.

    Example::

        library_versions()["torch"]   # e.g. '2.13.0', or 'not installed'
    """
    out = {}
    for name in ("pyvene-harm", "pyvene", "torch", "transformers", "safetensors"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
