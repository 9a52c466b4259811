"""Stable names for intervention classes, so that artifacts never store import paths.

pyvene's own ``load`` resolves classes by import path, which breaks as soon as a class moves
or was defined in ``__main__``. Artifacts here store a registry name instead; renaming a class
keeps old artifacts loadable as long as its registry name stays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["intervention_class", "register_intervention", "registered_interventions"]

_REGISTRY: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_intervention(name: str) -> Callable[[T], T]:
    """Class decorator giving an intervention class a stable artifact name.

    The class must provide ``artifact_config() -> dict`` (JSON-able constructor arguments),
    ``artifact_tensors() -> dict[str, Tensor]`` and a classmethod
    ``from_artifact(config, tensors)``.

    Example:
        >>> @register_intervention("my_lab.scaled_addition")
        ... class ScaledAddition(DirectionAddition): ...
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"registry name must be a non-empty string without surrounding spaces, not {name!r}")

    def decorate(cls: T) -> T:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"the intervention name {name!r} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}: choose another name"
            )
        for method in ("artifact_config", "artifact_tensors", "from_artifact"):
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"{cls.__qualname__} cannot be registered: it lacks {method}()")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def intervention_class(name: str) -> type:
    """The class registered under ``name``; a clear error for unknown names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown intervention type {name!r}: registered types are {', '.join(sorted(_REGISTRY))}; "
            "import the module that registers it, or upgrade pyvene-harm"
        ) from None


def registered_interventions() -> dict[str, type]:
    """A copy of the registry (name -> class)."""
    return dict(_REGISTRY)
