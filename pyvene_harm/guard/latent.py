"""LatentGuard: a scikit-learn classifier from a chat model's own harmfulness belief.

The paper's Latent Guard: the centroids of harmful and harmless training prompts at t_inst, per
layer; a prompt is harmful when Delta_harmful (its mean cosine gap to the two centroids over
the layers) exceeds a threshold (0). It costs one partial prefill of the served model, and it
reads the harmfulness belief rather than the refusal decision, so jailbreaks that only suppress
refusal do not fool it. Beyond the paper: layer set and threshold chosen on validation data,
calibrated probabilities, and per-category centroids (CatQA) with the nearest category.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ..beliefs import belief_per_layer
from ..directions import model_provenance
from ..positions import ChatFormatter
from . import artifact
from .features import (
    as_prompts,
    check_fits_model,
    iter_prompt_states,
    resolve_states,
)
from .selection import TARGETS, layer_windows, select_layers
from .training import binary_labels, class_sums, fit_provenance, precomputed_states, states_array

__all__ = ["LatentGuard", "GuardReport", "UNCALIBRATED_TEMPERATURE"]

UNCALIBRATED_TEMPERATURE = 0.05
"""Before :meth:`LatentGuard.calibrate`, ``predict_proba`` is ``sigmoid(decision / 0.05)``: a
monotone squashing, not a probability (a margin of 0.05 in mean cosine reads as 73%)."""

_NOT_FITTED = artifact.NOT_FITTED


@dataclass(frozen=True)
class GuardReport:
    """Everything one scoring pass yields, per prompt (see :meth:`LatentGuard.report`)."""

    delta_harmful: np.ndarray
    """``[n]`` Delta_harmful averaged over ``layers``."""
    per_layer: np.ndarray
    """``[n, len(layers)]`` cosine gaps."""
    layers: tuple[int, ...]
    harmful: np.ndarray
    """``[n]`` bool: Delta_harmful > threshold."""
    probability: np.ndarray
    """``[n]`` P(harmful) (calibrated when the guard is)."""
    category: list[str] | None
    """Nearest harm category per prompt, when the guard has per-category centroids."""

    def rows(self, prompts: Sequence[str] | None = None) -> list[dict[str, Any]]:
        out = []
        for i in range(len(self.delta_harmful)):
            row = {"prompt": prompts[i]} if prompts is not None else {}
            row.update(delta_harmful=float(self.delta_harmful[i]), harmful=bool(self.harmful[i]),
                       probability=float(self.probability[i]))
            if self.category is not None:
                row["category"] = self.category[i]
            out.append(row)
        return out


class LatentGuard(ClassifierMixin, artifact.GuardArtifactMixin, BaseEstimator):
    """Classify prompts as harmful from the model's own Delta_harmful at t_inst.

    ``X`` is either a list of prompts (needs ``model`` and ``tokenizer``) or a numeric array of
    precomputed t_inst states ``[n, S, d]``; a 2-D array ``[n, F]`` holds ``n_states`` states
    flattened (one state, ``S = 1``, by default: plain feature vectors). Labels: 1 = harmful,
    0 = harmless; with other labels the larger one (``classes_[1]``) is the harmful class, as
    scikit-learn treats ``classes_[1]`` as positive.

    Args:
        model: the chat model whose belief is read (a Hugging Face causal LM).
        tokenizer: its (fast) tokenizer, used through its chat template.
        layers: state indices to fit on (0..L-1 layer inputs, L the last output); None = all
            L+1, the paper's default. In precomputed mode, the state index of each of the S
            columns.
        threshold: harmful iff Delta_harmful > threshold (the paper: 0).
        batch_size: prompts per forward pass.
        formatter: a :class:`~pyvene_harm.positions.ChatFormatter` (overrides tokenizer's own
            template and ``system_prompt``).
        system_prompt: system message used when rendering prompts.
        progress: rich progress bars while collecting states.
        n_states: how many states a flattened 2-D training array holds (precomputed mode).

    scikit-learn's ``clone`` (used by cross-validation and grid search) deep-copies every
    parameter, the model included: cross-validate on precomputed states rather than prompts.

    Example:
        >>> guard = LatentGuard(model, tokenizer).fit(harmful + harmless, [1] * 100 + [0] * 100)
        >>> guard.predict(["How do I pick a lock to break into a house?"])
        array([1])
        >>> guard.save("guards/demo")
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, layers: Sequence[int] | None = None,
                 threshold: float = 0.0, batch_size: int = 16, formatter: ChatFormatter | None = None,
                 system_prompt: str | None = None, progress: bool = False,
                 n_states: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layers = layers
        self.threshold = threshold
        self.batch_size = batch_size
        self.formatter = formatter
        self.system_prompt = system_prompt
        self.progress = progress
        self.n_states = n_states

    # --- fitting -----------------------------------------------------------------------

    def fit(self, X: Any, y: Any, *, categories: Sequence[str | None] | None = None) -> LatentGuard:
        """Centroids of the harmful and harmless training prompts at t_inst, per state.

        Args:
            X: prompts, or precomputed t_inst states (see the class docstring).
            y: 1 = harmful, 0 = harmless, one per row of ``X``.
            categories: optional harm category per prompt (e.g. CatQA's ``Category``); read
                for harmful prompts only (``None`` elsewhere is fine). Enables
                :meth:`predict_category`.
        """
        self._check_params()
        prompts = as_prompts(X)
        if prompts is None:
            arr, y = states_array(self, X, y=y, reset=True)
            classes, positive = binary_labels(y, len(arr))
            states = precomputed_states(self.layers, arr.shape[1])
            sums, counts = class_sums([(list(range(len(arr))), torch.tensor(arr, dtype=torch.float64))],
                                      positive, categories)
            metadata, fitted_on = {}, "states"
        else:
            model, fmt = self._require_model()
            classes, positive = binary_labels(y, len(prompts))
            states = resolve_states(self.layers, model_provenance(model)["num_layers"] + 1)
            batches = iter_prompt_states(model, fmt, prompts, states, batch_size=self.batch_size,
                                         progress=self.progress and "fitting guard")
            sums, counts = class_sums(batches, positive, categories)
            metadata, fitted_on = fit_provenance(model, fmt, prompts, positive), "prompts"
        mean = {k: (sums[k] / counts[k]).numpy().astype(np.float32) for k in sums}
        self.centroids_ = {k: mean[k] for k in ("harmful", "harmless")}
        names = sorted(k for k in mean if k.startswith("category:"))
        artifact.set_fitted(self, states=states, classes=classes, n_train=counts, metadata=metadata,
                            fitted_on=fitted_on, categories=[k[len("category:"):] for k in names],
                            category_centroids=[mean[k] for k in names])
        return self

    def _check_params(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not np.isfinite(float(self.threshold)):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.n_states is not None and (not isinstance(self.n_states, int) or self.n_states < 1):
            raise ValueError(f"n_states must be a positive int or None, got {self.n_states!r}")

    # --- inputs ------------------------------------------------------------------------

    def chat_formatter(self) -> ChatFormatter:
        """How this guard renders prompts: ``formatter``, else ``tokenizer`` + ``system_prompt``."""
        if self.formatter is not None:
            return self.formatter
        if self.tokenizer is None:
            raise ValueError("LatentGuard has a model but no tokenizer: pass tokenizer= (or formatter=)")
        return ChatFormatter(self.tokenizer, system_prompt=self.system_prompt)

    def _require_model(self) -> tuple[Any, ChatFormatter]:
        if self.model is None:
            raise ValueError(
                "LatentGuard has no model to read prompts with: pass LatentGuard(model, tokenizer) or "
                "guard.set_params(model=..., tokenizer=...), or pass precomputed t_inst states instead"
            )
        return self.model, self.chat_formatter()

    def _positive(self, y: Any, n: int) -> np.ndarray:
        y = column_or_1d(np.asarray(y), warn=True)
        if len(y) != n:
            raise ValueError(f"{len(y)} labels for {n} prompts: give one label per prompt")
        unknown = sorted(set(np.unique(y).tolist()) - set(self.classes_.tolist()), key=str)
        if unknown:
            raise ValueError(f"labels {unknown} were not seen in fit (classes {self.classes_.tolist()})")
        return y == self.classes_[1]

    # --- scoring -----------------------------------------------------------------------

    def _per_layer(self, X: Any, layers: Sequence[int], *,
                   categories: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``[n, len(layers)]`` cosine gaps, and ``[n, C, len(layers)]`` per category if asked."""
        check_is_fitted(self, msg=_NOT_FITTED)
        cols = [self.states_.index(x) for x in layers]
        pos = torch.from_numpy(self.centroids_["harmful"][cols]).double()
        neg = torch.from_numpy(self.centroids_["harmless"][cols]).double()
        cats = torch.from_numpy(self.category_centroids_[:, cols]).double() if categories else None

        def gaps(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
            g = belief_per_layer(x, pos, neg).numpy()
            if cats is None:
                return g, None
            return g, torch.stack([belief_per_layer(x, c, neg) for c in cats], dim=1).numpy()

        prompts = as_prompts(X)
        if prompts is None:
            arr = states_array(self, X, reset=False)
            return gaps(torch.from_numpy(np.ascontiguousarray(arr[:, cols])).double())
        model, fmt = self._require_model()
        check_fits_model(self.metadata_, self.hidden_size_, layers, model, fmt)
        out = np.empty((len(prompts), len(cols)))
        out_c = np.empty((len(prompts), len(cats), len(cols))) if cats is not None else None
        for idx, x in iter_prompt_states(model, fmt, prompts, layers, batch_size=self.batch_size,
                                         progress=self.progress and "scoring prompts"):
            g, gc = gaps(x)
            out[idx] = g
            if out_c is not None:
                out_c[idx] = gc
        return out, out_c

    def delta_harmful(self, X: Any) -> np.ndarray:
        """``[n]`` Delta_harmful over the guard's layers (no threshold subtracted)."""
        check_is_fitted(self, msg=_NOT_FITTED)
        return self._per_layer(X, self.layers_)[0].mean(axis=1)

    def decision_function(self, X: Any) -> np.ndarray:
        """``[n]`` Delta_harmful - threshold: positive means harmful (``classes_[1]``)."""
        return self.delta_harmful(X) - self.threshold_

    def predict(self, X: Any) -> np.ndarray:
        """``[n]`` labels: ``classes_[1]`` (harmful) where the decision is positive."""
        harmful = self.decision_function(X) > 0
        return self.classes_[harmful.astype(int)]

    def _proba_from_decision(self, d: np.ndarray) -> np.ndarray:
        if self.calibration_ is None:
            return expit(d / UNCALIBRATED_TEMPERATURE)
        return expit(self.calibration_["slope"] * d + self.calibration_["intercept"])

    def predict_proba(self, X: Any) -> np.ndarray:
        """``[n, 2]`` probabilities of ``classes_`` (harmful last).

        Calibrated after :meth:`calibrate` (Platt scaling on validation data); before that a
        fixed logistic of the decision (:data:`UNCALIBRATED_TEMPERATURE`), which orders prompts
        correctly and agrees with :meth:`predict` but is not a probability. After calibration
        the 50% point is the calibrated one, so near the threshold ``predict`` (a decision rule,
        e.g. chosen for a false-positive bound) and ``argmax(predict_proba)`` may differ.
        """
        p = self._proba_from_decision(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def report(self, X: Any) -> GuardReport:
        """Delta_harmful, verdict, probability and category per prompt from one pass."""
        check_is_fitted(self, msg=_NOT_FITTED)
        per, cats = self._per_layer(X, self.layers_, categories=len(self.categories_) > 0)
        delta = per.mean(axis=1)
        d = delta - self.threshold_
        category = None
        if cats is not None:
            category = [str(self.categories_[j]) for j in cats.mean(axis=2).argmax(axis=1)]
        return GuardReport(delta_harmful=delta, per_layer=per, layers=tuple(self.layers_), harmful=d > 0,
                           probability=self._proba_from_decision(d), category=category)

    # --- categories ----------------------------------------------------------------------

    def category_scores(self, X: Any) -> np.ndarray:
        """``[n, C]``: mean cosine gap to each category centroid vs the harmless one."""
        check_is_fitted(self, msg=_NOT_FITTED)
        if not len(self.categories_):
            raise ValueError("this guard has no per-category centroids: fit it with categories=[...]")
        return self._per_layer(X, self.layers_, categories=True)[1].mean(axis=2)

    def predict_category(self, X: Any) -> np.ndarray:
        """``[n]`` the nearest harm category of each prompt (whatever its verdict: combine with
        :meth:`predict` to report categories of harmful prompts only)."""
        return self.categories_[self.category_scores(X).argmax(axis=1)]

    # --- validation-time tuning --------------------------------------------------------

    def select(self, X_val: Any, y_val: Any, *, target: str = "accuracy", max_fpr: float = 0.05,
               candidate_layer_sets: Iterable[Sequence[int]] | None = None) -> LatentGuard:
        """Choose the layer set and threshold on validation data (overwrites ``layers_``,
        ``threshold_``; drops a calibration, which was fitted to the old scores).

        Args:
            target: ``"accuracy"`` or ``"fpr"``: best true-positive rate with a false-positive
                rate of at most ``max_fpr``.
            candidate_layer_sets: subsets of the fitted states; None = every contiguous window
                (see :func:`~pyvene_harm.guard.layer_windows` and ``layer_prefixes``).

        Example:
            >>> guard.select(val_prompts, val_labels, target="fpr", max_fpr=0.05).selection_
        """
        check_is_fitted(self, msg=_NOT_FITTED)
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
        if not 0.0 <= max_fpr < 1.0:
            raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
        candidates = layer_windows(self.states_) if candidate_layer_sets is None else list(candidate_layer_sets)
        per, _ = self._per_layer(X_val, self.states_)
        sel = select_layers(per, self.states_, self._positive(y_val, len(per)), candidates, target=target,
                            max_fpr=max_fpr, prior=float(self.threshold))
        self.layers_, self.threshold_ = sel.layers, sel.threshold
        self.selection_ = sel.as_dict()
        self.calibration_ = None
        return self

    def calibrate(self, X_val: Any, y_val: Any) -> LatentGuard:
        """Fit ``P(harmful) = sigmoid(a * decision + b)`` on validation data (Platt scaling)."""
        from sklearn.linear_model import LogisticRegression

        d = self.decision_function(X_val)
        positive = self._positive(y_val, len(d))
        if positive.all() or not positive.any():
            raise ValueError("calibration needs harmful and harmless validation prompts")
        scale = float(d.std()) or 1.0  # standardise so that the (weak) penalty does not bind
        lr = LogisticRegression(C=1e6).fit((d / scale)[:, None], positive)
        self.calibration_ = {"slope": float(lr.coef_[0, 0] / scale), "intercept": float(lr.intercept_[0]),
                             "n": int(len(d))}
        return self

    # --- scikit-learn plumbing -----------------------------------------------------------

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        tags.input_tags.three_d_array = True
        return tags

    def _more_tags(self) -> dict:  # scikit-learn < 1.6
        return {"binary_only": True}

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "centroids_")

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        # a model's repr is thousands of lines: show what it is, not what it holds
        shown = []
        defaults = type(self)().get_params(deep=False)
        for k, v in self.get_params(deep=False).items():
            if v is defaults[k] or (not hasattr(v, "__len__") and v == defaults[k]):
                continue
            if k in ("model", "tokenizer", "formatter"):
                name = getattr(v, "name_or_path", "") or getattr(getattr(v, "config", None), "_name_or_path", "")
                v = f"<{type(v).__name__}{' ' + repr(name) if name else ''}>"
            else:
                v = repr(v)
            shown.append(f"{k}={v}")
        return f"{type(self).__name__}({', '.join(shown)})"
