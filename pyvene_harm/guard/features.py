"""What a Latent Guard reads: prompts (through the model, with early exit) or precomputed states.

Two input kinds share one estimator. A list of strings is a list of prompts: their t_inst states
are collected from the model, stopping after the deepest layer the guard needs. Anything else is
a numeric array of precomputed t_inst states ``[n, S, d]`` (or flattened ``[n, S*d]``), which is
what scikit-learn's own tooling (``check_estimator``, pipelines, cross-validation on cached
states) works with. Telling the two apart happens here, once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..collect import collect_states
from ..conversation import Conversation
from ..directions import DirectionSetMismatch, model_provenance
from ..positions import ChatFormatter

__all__ = [
    "PROVENANCE_KEYS",
    "GuardMismatch",
    "as_prompts",
    "check_fits_model",
    "iter_prompt_states",
    "resolve_states",
    "to_array",
]

PROVENANCE_KEYS = ("model_id", "architecture", "hidden_size", "num_layers", "chat_template_hash")
"""What a guard records about the model it was fitted on (the DirectionSet's keys)."""


class GuardMismatch(DirectionSetMismatch):
    """A guard was applied to a model it was not fitted on.

    A subclass of :class:`~pyvene_harm.directions.DirectionSetMismatch`, so code that catches
    one artifact mismatch catches both.
    """


def as_prompts(X: Any) -> list[str | Conversation] | None:
    """``X`` as a list of prompts, or None when it is (meant to be) a numeric array of states.

    A prompt is an instruction string or a :class:`~pyvene_harm.conversation.Conversation`
    (read at its last user message). Raises on the inputs that are surely mistakes: one bare
    string (which would otherwise be read as a list of characters), an empty list, and a list
    mixing prompts with other things.
    """
    if isinstance(X, str):
        raise TypeError(f"pass a list of prompts, not one string: use [{X[:40]!r}]")
    if isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ValueError("empty prompt list: pass at least one prompt (or an array of states)")
        if not any(isinstance(x, (str, Conversation)) for x in X):
            return None
        bad = next((i for i, x in enumerate(X) if not isinstance(x, (str, Conversation))), None)
        if bad is not None:
            raise TypeError(f"prompt {bad} is a {type(X[bad]).__name__}, not a str: "
                            "pass a list of prompt strings")
        return list(X)
    if getattr(X, "ndim", None) == 1 and hasattr(X, "dtype"):  # numpy / pandas column of text
        arr = np.asarray(X)
        if arr.dtype.kind in "US" or (arr.dtype == object and len(arr) and isinstance(arr[0], str)):
            return as_prompts(arr.tolist())
    return None


def to_array(X: Any) -> Any:
    """Torch tensors become numpy (bfloat16 has no numpy twin); everything else passes."""
    if isinstance(X, torch.Tensor):
        return X.detach().to("cpu", torch.float32).numpy()
    return X


def resolve_states(layers: Sequence[int] | None, n_states: int) -> tuple[int, ...]:
    """The state indices a guard reads, all ``n_states`` by default, validated.

    State ``l < L`` is the residual stream entering decoder layer ``l``; state ``L`` is the
    last layer's output (the paper's L+1 states).
    """
    if layers is None:
        return tuple(range(n_states))
    try:
        if isinstance(layers, (str, bytes)):
            raise TypeError
        out = sorted({int(x) for x in layers})
    except (TypeError, ValueError):
        raise TypeError(f"layers must be a list of state indices such as [0, 5, 9] or None (all), "
                        f"not {layers!r}") from None
    if not out:
        raise ValueError("empty layer set: choose at least one layer (or layers=None for all)")
    bad = [x for x in out if not 0 <= x < n_states]
    if bad:
        raise ValueError(
            f"layer {bad[0]} is out of range: this model has {n_states - 1} decoder layers, "
            f"so states 0-{n_states - 1} ({n_states - 1} is the last layer's output)"
        )
    return tuple(out)


def check_fits_model(metadata: Mapping[str, Any], hidden_size: int, states: Sequence[int],
                     model: nn.Module, formatter: ChatFormatter | None) -> None:
    """Raise :class:`GuardMismatch` listing every way ``model`` differs from the fitted one.

    The same comparison as :meth:`DirectionSet.check_model` (architecture, hidden size, layer
    count, chat-template hash; unknown values are skipped), plus the two facts a guard needs
    whatever its provenance: the centroids' width and the deepest state it reads.
    """
    actual = model_provenance(model, formatter)
    diffs = []
    for key in ("architecture", "hidden_size", "num_layers", "chat_template_hash"):
        want, got = metadata.get(key), actual.get(key)
        if want is not None and got is not None and want != got:
            diffs.append(f"{key}: guard {want!r}, model {got!r}")
    if formatter is not None and "system_prompt" in metadata and metadata["system_prompt"] != formatter.system_prompt:
        # not an error: a user may mean it, but the centroids were taken under the other one
        warnings.warn(f"this guard was fitted with system prompt {metadata['system_prompt']!r} but scores with "
                      f"{formatter.system_prompt!r}: Delta_harmful shifts with the system prompt", stacklevel=4)
    keys = {d.split(":", 1)[0] for d in diffs}
    if "hidden_size" not in keys and actual["hidden_size"] and hidden_size != actual["hidden_size"]:
        diffs.append(f"hidden_size: guard {hidden_size}, model {actual['hidden_size']}")
    if "num_layers" not in keys and states and max(states) > actual["num_layers"]:
        diffs.append(f"states: guard reads state {max(states)}, model has states 0-{actual['num_layers']}")
    if diffs:
        raise GuardMismatch(
            f"this guard was fitted on {metadata.get('model_id') or 'another model'!r} and does not fit "
            f"this model ({'; '.join(diffs)}): fit a guard for this model, e.g. "
            "LatentGuard(model, tokenizer).fit(prompts, labels)"
        )


def iter_prompt_states(model: nn.Module, formatter: ChatFormatter, prompts: Sequence[str],
                       states: Sequence[int], *, batch_size: int, progress: bool | str,
                       reads: Sequence[str] = ("t_inst",)) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(prompt indices, float64 CPU states [b, len(reads) * len(states), d])``.

    Columns are read-major: every state of the first read, then of the next.
    :func:`~pyvene_harm.collect.collect_states` runs the bare decoder (no LM head), only up to
    the deepest state in ``states`` (the guard's early exit) and only up to the last token any
    read needs; the one KV cache it builds is that of the template prefix every prompt shares,
    run once per call.
    """
    reads = list(reads)
    for idx, by_read in collect_states(model, formatter, prompts, states=states, positions=reads,
                                       batch_size=batch_size, progress=progress):
        yield idx, torch.cat([by_read[r] for r in reads], dim=1).to("cpu", torch.float64)
