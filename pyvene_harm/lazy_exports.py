"""Re-exports resolved on first use (PEP 562), so importing a package costs nothing.

``pyvene-harm --help`` imports ``pyvene_harm.cli``, which imports the package first: with eager
re-exports that alone pulled in torch, transformers and pyvene (several seconds) before click
had parsed an option. A package's ``__init__`` names what it re-exports and from where; the
submodule is imported the first time one of its names is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return the ``__getattr__`` and ``__dir__`` of a package whose names load on demand.

    Args:
        package: the package's ``__name__``.
        exports: submodule (relative, without the dot) -> the names it provides.
        namespace: the package's ``globals()``; a resolved name is stored there, so the next
            read is an ordinary attribute lookup.

    Example::

        __getattr__, __dir__ = lazy_exports(__name__, {"models": ("load_model",)}, globals())
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
