"""Prompt sets labelled by the model's own refusals, stored as resumable run units."""

from __future__ import annotations

from .options import PromptSet
from .rundir import RunDir

__all__ = ["labelled_units"]


def labelled_units(run: RunDir, sets: list[PromptSet], model_and_fmt, *, max_new_tokens: int,
                   batch_size: int) -> dict[str, dict]:
    """name -> {"prompts", "replies", "refused"}; each set generated once, then read back."""
    from ..analysis import label_replies

    out = {}
    for ps in sets:
        def compute(ps=ps):
            loaded, fmt = model_and_fmt()
            lab = label_replies(loaded.model, fmt, ps.prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=f"answering {ps.name}")
            return {"prompts": lab.prompts, "replies": lab.replies, "refused": lab.refused}

        out[ps.name] = run.unit(f"replies_{ps.name}", compute)
    return out


class LazyModel:
    """Loads the model on first use, so resumed runs that need no model never load one."""

    def __init__(self, mopts) -> None:
        self.mopts = mopts
        self._value = None

    def __call__(self):
        if self._value is None:
            from .options import load_for_recipe

            self._value = load_for_recipe(self.mopts)
        return self._value
