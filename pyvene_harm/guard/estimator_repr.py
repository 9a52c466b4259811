"""A short ``repr`` for estimators that hold a model.

scikit-learn's ``BaseEstimator.__repr__`` prints every parameter that differs from its default,
and a model's repr is thousands of lines: this one names the model, tokenizer or formatter instead.
"""

from __future__ import annotations

__all__ = ["ModelHoldingRepr"]


class ModelHoldingRepr:
    """Mix in before ``BaseEstimator``: parameters at their defaults are left out, as scikit-learn
    does, and ``model``, ``tokenizer`` and ``formatter`` are shown by class and name."""

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        # a model's repr is thousands of lines: show what it is, not what it holds
        shown = []
        defaults = type(self)().get_params(deep=False)
        for k, v in self.get_params(deep=False).items():
            if v is defaults[k] or (not hasattr(v, "__len__") and v == defaults[k]) or (
                    isinstance(v, (tuple, list)) and list(v) == list(defaults[k] or [])):
                continue
            if k in ("model", "tokenizer", "formatter"):
                name = getattr(v, "name_or_path", "") or getattr(getattr(v, "config", None), "_name_or_path", "")
                v = f"<{type(v).__name__}{' ' + repr(name) if name else ''}>"
            else:
                v = repr(v)
            shown.append(f"{k}={v}")
        return f"{type(self).__name__}({', '.join(shown)})"
