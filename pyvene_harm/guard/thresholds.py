"""Where a Latent Guard draws its line: the threshold and the probabilities around it.

Kept apart from the estimator (:mod:`~pyvene_harm.guard.latent`) because a guard's threshold is
set in three different places, each recorded in ``selection_`` (saved in guard.json): on
validation prompts when fitted (:meth:`ThresholdMixin.select`, also choosing the paper guard's
layers), on a deployment's own traffic or a harmless set afterwards
(:meth:`ThresholdMixin.set_threshold_by_flag_rate`, ``pyvene-harm guard calibrate``), and
probabilities are fitted around it (:meth:`ThresholdMixin.calibrate`, Platt scaling).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from .artifact import NOT_FITTED as _NOT_FITTED
from .selection import TARGETS, choose_threshold, layer_windows, select_layers

__all__ = ["ThresholdMixin"]


class ThresholdMixin:
    """Threshold choice and probability calibration of a fitted :class:`LatentGuard`."""

    def select(self, X_val: Any, y_val: Any, *, target: str = "accuracy", max_fpr: float = 0.05,
               candidate_layer_sets: Iterable[Sequence[int]] | None = None) -> Any:
        """Choose the threshold, and for ``method="paper"`` the layer set, on validation data
        (overwrites ``layers_``, ``threshold_``; drops a calibration, which was fitted to the
        old scores). A linear read-out keeps the layers it was fitted on.

        Args:
            target: ``"accuracy"`` or ``"fpr"``: best true-positive rate with a false-positive
                rate of at most ``max_fpr``.
            candidate_layer_sets: subsets of the fitted states (``method="paper"`` only); None =
                every contiguous window (see :func:`~pyvene_harm.guard.layer_windows` and
                ``layer_prefixes``).

        Example:
            >>> guard.select(val_prompts, val_labels, target="fpr", max_fpr=0.05).selection_
        """
        check_is_fitted(self, msg=_NOT_FITTED)
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
        if not 0.0 <= max_fpr < 1.0:
            raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
        if self.readout_ is not None:
            if candidate_layer_sets is not None:
                raise ValueError("a linear read-out is fitted on its layers as a whole: refit with other "
                                 "layers instead of passing candidate_layer_sets")
            _, _, score = self._decision_scores(X_val)
            positive = self._positive(y_val, len(score))
            ch = choose_threshold(score, positive, target=target, max_fpr=max_fpr, prior=float(self.threshold))
            self.threshold_ = ch.threshold
            self.selection_ = {"target": target, "max_fpr": max_fpr if target == "fpr" else None,
                               "layers": list(self.layers_), "threshold": ch.threshold, "accuracy": ch.accuracy,
                               "tpr": ch.tpr, "fpr": ch.fpr, "n_val": int(len(score)), "n_candidates": 1}
        else:
            candidates = layer_windows(self.states_) if candidate_layer_sets is None else list(candidate_layer_sets)
            per, _, _ = self._scores(X_val, self.states_)
            # one column per state: average a multi-read guard's columns over its reads
            per = per.reshape(len(per), len(self.reads_), len(self.states_)).mean(axis=1)
            sel = select_layers(per, self.states_, self._positive(y_val, len(per)), candidates, target=target,
                                max_fpr=max_fpr, prior=float(self.threshold))
            self.layers_, self.threshold_ = sel.layers, sel.threshold
            self.selection_ = sel.as_dict()
        self.calibration_ = None
        return self

    def set_threshold_by_flag_rate(self, X: Any, rate: float, *, how: str = "traffic",
                                   source: dict[str, Any] | None = None) -> Any:
        """Move the threshold so that at most ``rate`` of the prompts ``X`` are flagged.

        A threshold learnt on training sources does not transfer to a deployment's own traffic
        (unseen harmless sources rank well but score above it); setting it on that traffic does.
        ``how="traffic"``: ``X`` is a deployment's own unlabelled, mostly harmless prompts and
        ``rate`` the share it can afford to flag; ``how="max_fpr"``: ``X`` is a harmless set and
        ``rate`` the false-positive rate allowed on it. The guard records how its threshold was
        set in ``selection_`` (saved in guard.json; serve and demo print it). A Platt
        calibration is kept consistent: probabilities do not move, only the verdict's cut.
        Prompts whose score cannot be computed count as flagged.
        """
        from .metrics import threshold_at_flag_rate

        check_is_fitted(self, msg=_NOT_FITTED)
        if how not in ("traffic", "max_fpr"):
            raise ValueError(f"how must be traffic or max_fpr, got {how!r}")
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"the flag rate must be in [0, 1), got {rate}: e.g. 0.01 flags 1% of the traffic")
        raw = self._decision_scores(X)[2]
        raw = np.where(np.isfinite(raw), raw, np.inf)
        old, new = float(self.threshold_), threshold_at_flag_rate(raw, rate)
        if not np.isfinite(new):
            raise ValueError(f"more than {rate:.1%} of these prompts have no finite score: a threshold cannot be set "
                             "on them; check the model and the guard match")
        if self.calibration_ is not None:  # P(harmful) = sigmoid(a * (raw - t) + b) stays the same
            self.calibration_ = {**self.calibration_,
                                 "intercept": float(self.calibration_["intercept"] + self.calibration_["slope"]
                                                    * (new - old))}
        self.threshold_ = new
        self.selection_ = {"target": "flag_rate" if how == "traffic" else "max_fpr", "rate": float(rate),
                           "threshold": new, "previous_threshold": old, "n": int(len(raw)),
                           "flagged": float((raw > new).mean()), **(source or {})}
        return self

    def describe_threshold(self) -> str:
        """One line on how the threshold was set (startup logs of serve and demo print it)."""
        check_is_fitted(self, msg=_NOT_FITTED)
        sel = self.selection_ or {}
        t = f"threshold {self.threshold_:+.4f}"
        if sel.get("target") == "flag_rate":
            where = f" of {sel['file']}" if sel.get("file") else ""
            return f"{t}, set to flag {sel['rate']:.1%} of {sel['n']} traffic prompts{where}"
        if sel.get("target") == "max_fpr" and "rate" in sel:
            where = f" of {sel['file']}" if sel.get("file") else ""
            return f"{t}, set for a false-positive rate of at most {sel['rate']:.1%} on {sel['n']} harmless prompts{where}"
        if sel.get("target") in ("accuracy", "fpr"):
            return f"{t}, chosen on validation prompts ({sel['target']})"
        return f"{t}, as fitted" + (" (the read-out's P(harmful) = 0.5)" if self.readout_ is not None else "")

    def calibrate(self, X_val: Any, y_val: Any) -> Any:
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

