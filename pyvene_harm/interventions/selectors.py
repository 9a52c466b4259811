"""Which token positions an intervention touches: typed selectors, unions, and padding for pyvene.

A selector is any ``Callable[[PromptBatch], list[list[int]]]``: one sorted list of positions
per example, indexing the *padded* sequence, so a selector is right under left or right padding
by construction (it reads the per-example indices of :class:`~pyvene_harm.positions.PromptBatch`).

The factories below return :class:`PositionSelector` values, which also carry a stable name
(written into artifacts) and whether every *generated* token is steered too. Strings such as
``"t_inst+t_post_inst"`` are parsed once, at the boundary, by :func:`parse_positions`.

pyvene refuses ragged location lists, and a padded slot must not steer anything. A slot is
therefore padded with a position the example did *not* select, and a 0/1 slot mask goes to
the interventions through ``intervention_additional_kwargs``: the padded slot gathers a state
and writes it back unchanged. Padding with an already selected position would instead make
pyvene scatter two values into one position, and which one wins is unspecified on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..positions import PromptBatch

__all__ = [
    "PositionSelector",
    "SelectedPositions",
    "Selector",
    "all_prompt",
    "context",
    "generated",
    "parse_positions",
    "post_inst",
    "prompt_mask",
    "select_positions",
    "selector_name",
    "selector_names",
    "t_inst",
    "t_post_inst",
    "union",
]

Selector = Callable[[PromptBatch], list[list[int]]]
"""Per example, the sorted positions (indices into the padded sequence) to intervene on."""


@dataclass(frozen=True)
class PositionSelector:
    """A named selector; ``generated`` adds every generated token during generation.

    Call it on a batch to get the prompt positions. Combine with :func:`union` or ``a | b``.
    """

    name: str
    select: Selector
    generated: bool = False

    def __call__(self, batch: PromptBatch) -> list[list[int]]:
        return self.select(batch)

    def __or__(self, other: PositionSelector) -> PositionSelector:
        return union(self, other)

    def __str__(self) -> str:
        return self.name


def _spans(starts: torch.Tensor, ends: torch.Tensor) -> list[list[int]]:
    """Inclusive ranges ``starts[i]..ends[i]`` per example (empty when end < start)."""
    return [list(range(int(s), int(e) + 1)) for s, e in zip(starts.tolist(), ends.tolist())]


def t_inst() -> PositionSelector:
    """The last token of the user's instruction (where the harmfulness direction is read)."""
    return PositionSelector("t_inst", lambda b: [[int(p)] for p in b.t_inst.tolist()])


def t_post_inst() -> PositionSelector:
    """The last prompt token (where the refusal direction is read)."""
    return PositionSelector("t_post_inst", lambda b: [[int(p)] for p in b.t_post_inst.tolist()])


def post_inst() -> PositionSelector:
    """The post-instruction tokens: after t_inst up to t_post_inst (empty without a template suffix).

    t_inst itself is an instruction token; use ``"t_inst+post_inst"`` for t_inst..t_post_inst.
    """
    return PositionSelector("post_inst", lambda b: _spans(b.t_inst + 1, b.t_post_inst))


def all_prompt() -> PositionSelector:
    """Every non-pad prompt token (the paper's default steering positions)."""

    def select(b: PromptBatch) -> list[list[int]]:
        return [torch.nonzero(row, as_tuple=False).flatten().tolist() for row in b.attention_mask.cpu()]

    return PositionSelector("all_prompt", select)


def context() -> PositionSelector:
    """The prompt up to the end of the wrapped instruction, before an appended question.

    For reply inversion (``wrapper="User wants to {instruction}\\nCould ...?"``) this is the
    template prefix plus the instruction, without the question and the post-instruction tokens.
    """
    return PositionSelector("context", lambda b: _spans(b.prompt_start, b.inner_end))


def generated() -> PositionSelector:
    """No prompt position, but every generated token (during generation only)."""
    return PositionSelector("generated", lambda b: [[] for _ in range(len(b))], generated=True)


def union(*selectors: Selector) -> PositionSelector:
    """Positions selected by any of ``selectors`` (each once, sorted), per example.

    Example:
        >>> sel = union(t_inst(), t_post_inst())      # same as parse_positions("t_inst+t_post_inst")
    """
    if not selectors:
        raise ValueError("union() needs at least one selector")
    names = [getattr(s, "name", None) or getattr(s, "__name__", "custom") for s in selectors]

    def select(b: PromptBatch) -> list[list[int]]:
        per = [s(b) for s in selectors]
        return [sorted({int(p) for sel in per for p in sel[i]}) for i in range(len(b))]

    return PositionSelector("+".join(names), select, any(getattr(s, "generated", False) for s in selectors))


_FACTORIES: dict[str, Callable[[], PositionSelector]] = {
    "t_inst": t_inst,
    "t_post_inst": t_post_inst,
    "post_inst": post_inst,
    "all_prompt": all_prompt,
    "context": context,
    "generated": generated,
}


def selector_names() -> tuple[str, ...]:
    """The names :func:`parse_positions` accepts (join several with ``+``)."""
    return tuple(_FACTORIES)


def parse_positions(spec: str | Selector) -> PositionSelector | Selector:
    """A selector from a name such as ``"t_inst"`` or a union such as ``"t_inst+t_post_inst"``.

    Selectors (callables) pass through unchanged, so every builder accepts either.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"positions must be a selector name or a callable, not {type(spec).__name__}")
    parts = [p.strip() for p in spec.split("+")]
    unknown = [p for p in parts if p not in _FACTORIES]
    if unknown or not parts:
        raise ValueError(
            f"unknown position selector {unknown[0] if unknown else spec!r} in {spec!r}: valid names are "
            f"{', '.join(_FACTORIES)}, joined with '+' for a union (e.g. 't_inst+t_post_inst')"
        )
    if len(parts) == 1:
        return _FACTORIES[parts[0]]()
    return union(*(_FACTORIES[p]() for p in dict.fromkeys(parts)))


def selector_name(selector: Selector) -> str:
    """The stable name of a selector built by this module (for artifacts); else a clear error."""
    name = getattr(selector, "name", None)
    if isinstance(selector, PositionSelector) and name:
        try:
            parse_positions(name)
        except ValueError:
            pass
        else:
            return name
    raise ValueError(
        f"cannot save the custom position selector {selector!r}: only named selectors "
        f"({', '.join(_FACTORIES)} and their unions) can be written to an artifact"
    )


@dataclass(frozen=True)
class SelectedPositions:
    """Positions padded to one length for pyvene, with a mask of the real slots.

    ``positions`` is ``[batch][n_slots]`` (what ``unit_locations`` wants); ``mask`` is a
    ``[batch, n_slots]`` 0/1 tensor, 0 on padding slots (pass it as ``slot_mask``).
    """

    positions: list[list[int]]
    mask: torch.Tensor

    @property
    def n_slots(self) -> int:
        return int(self.mask.shape[1])

    def unit_locations(self, n_interventions: int) -> dict:
        """pyvene's fully nested, per-example locations for ``n_interventions`` interventions."""
        return {"sources->base": (None, [self.positions] * n_interventions)}


def _check_positions(chosen: Sequence[Sequence[int]], batch: PromptBatch) -> list[list[int]]:
    if len(chosen) != len(batch):
        raise ValueError(f"the selector returned {len(chosen)} position lists for a batch of {len(batch)}")
    out = []
    for i, row in enumerate(chosen):
        row = sorted({int(p) for p in row})
        bad = [p for p in row if not 0 <= p < batch.seq_len]
        if bad:
            raise ValueError(
                f"the selector chose position {bad[0]} for example {i}, outside the padded sequence "
                f"of {batch.seq_len} tokens: positions index the padded batch and are never negative"
            )
        out.append(row)
    return out


def select_positions(selector: Selector, batch: PromptBatch) -> SelectedPositions:
    """Run ``selector`` on ``batch`` and pad the ragged result for pyvene.

    Example i is padded with positions it did not select (there are always enough, since no
    example selects more than ``seq_len`` distinct positions); their mask is 0.
    """
    rows = _check_positions(selector(batch), batch)
    n = max(1, max(len(r) for r in rows))
    positions, mask = [], torch.zeros((len(rows), n), dtype=torch.float32)
    for i, row in enumerate(rows):
        chosen = set(row)
        free = (p for p in range(batch.seq_len) if p not in chosen)
        positions.append(row + [next(free) for _ in range(n - len(row))])
        mask[i, : len(row)] = 1.0
    return SelectedPositions(positions=positions, mask=mask)


def prompt_mask(selector: Selector, batch: PromptBatch) -> torch.Tensor:
    """``[batch, seq_len]`` 0/1 mask of the selected prompt positions (for whole-sequence modes)."""
    rows = _check_positions(selector(batch), batch)
    mask = torch.zeros((len(rows), batch.seq_len), dtype=torch.float32)
    for i, row in enumerate(rows):
        mask[i, row] = 1.0
    return mask
