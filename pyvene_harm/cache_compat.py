"""The key/value cache's name across transformers versions, without deprecation warnings.

transformers 5.x renamed ``past_key_values`` to ``cache``, both as a forward argument and as
an output field; the old names still work but warn on every call (a FutureWarning per forward,
a logged warning on reading the output), which a user can do nothing about. transformers 4.57,
the oldest this project supports, knows only the old name. The forward's signature tells
which one the installed version takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["cache_argument", "output_cache"]


def cache_argument(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes its cache by: ``"cache"`` or ``"past_key_values"``.

    Example::

        inputs[cache_argument(model.model)] = cache   # 'cache' on transformers 5.x
    """
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the old name works everywhere
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(outputs: Mapping[str, Any]) -> Any:
    """The cache a forward returned (``outputs.cache``, or ``outputs.past_key_values`` before 5.x).

    Example::

        cache = output_cache(model.model(input_ids=ids, use_cache=True))
    """
    keys = outputs.keys()
    return outputs["cache"] if "cache" in keys else outputs["past_key_values"]
