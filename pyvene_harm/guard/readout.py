"""How a Latent Guard turns the states it reads into one harmfulness score per prompt.

Two read-outs share the guard's feature layout, ``[n, F, d]``: F columns (one per read and
state, read-major) of hidden-state vectors.

* ``"paper"`` (:func:`centroid_gap`): the paper's Delta_harmful, the mean over columns of the
  cosine to the harmful centroid minus the cosine to the harmless one. No parameters beyond the
  two centroids; a threshold of 0.
* ``"linear"`` (:class:`LinearReadout`): standardised states, one regularised logistic
  regression over all columns, its strength chosen by cross-validation inside the training
  data (by source when the caller says which prompt came from where). Its score is a log-odds.
  A weight vector can use directions the centroid difference ignores and discount the ones
  that carry surface form (the last token's identity) rather than harmfulness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..beliefs import belief_per_layer

__all__ = ["DEFAULT_CS", "DEFAULT_RANK", "LinearReadout", "METHODS", "WIDE_CS", "centroid_gap"]

METHODS = ("paper", "linear")

DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 1, 5))
"""Inverse regularisation strengths tried by cross-validation (scikit-learn's ``C``)."""

WIDE_CS = tuple(float(c) for c in np.logspace(-5, 1, 7))
"""A grid two decades lower (``Cs="wide"``): the demo guards' choice sat on DEFAULT_CS's low
edge, so the best strength may lie below it."""

DEFAULT_RANK = 256
"""Principal directions of the standardised states a linear read-out keeps (see
:meth:`LinearReadout.fit`)."""


def centroid_gap(x: torch.Tensor, harmful: torch.Tensor, harmless: torch.Tensor) -> np.ndarray:
    """``[n, F]`` cosine gaps of states ``[n, F, d]`` to two ``[F, d]`` centroids (float64)."""
    return belief_per_layer(x.double(), harmful.double(), harmless.double()).numpy()


@dataclass
class LinearReadout:
    """``score(x) = w . (x - mean) / scale + b`` over the flattened ``[F * d]`` states.

    Build it with :meth:`fit`; store it as four tensors (:meth:`tensors`) and rebuild it with
    :meth:`from_tensors`.
    """

    mean: np.ndarray
    """``[F, d]`` training mean of each state coordinate."""
    scale: np.ndarray
    """``[F, d]`` training standard deviation (1 where a coordinate is constant)."""
    coef: np.ndarray
    """``[F, d]`` logistic-regression weights on the standardised states."""
    intercept: float
    C: float
    """The inverse regularisation strength used."""
    cv: dict[str, Any] | None = None
    """How ``C`` was chosen: candidates, mean held-out log-loss per candidate, folds, grouping."""

    @classmethod
    def fit(cls, x: np.ndarray, positive: np.ndarray, *, C: float | None = None,
            Cs: tuple[float, ...] = DEFAULT_CS, groups: np.ndarray | None = None, n_folds: int = 5,
            sample_weight: np.ndarray | None = None, rank: int | None = DEFAULT_RANK,
            max_iter: int = 2000) -> LinearReadout:
        """Standardise, keep the top principal directions, fit a class-balanced L2 logistic
        regression there, and express its weights on the states themselves.

        Args:
            x: ``[n, F, d]`` training states.
            positive: ``[n]`` True for harmful.
            C: a fixed strength; None chooses one from ``Cs`` by cross-validated log-loss.
            groups: ``[n]`` group of each row for the cross-validation folds (e.g. the prompt
                set it came from, so that ``C`` is chosen for unseen sets; surface variants of
                one prompt must share a group); None: stratified folds over rows.
            n_folds: folds (at most the number of groups).
            sample_weight: ``[n]`` row weights (e.g. to give every prompt set the same say).
            rank: principal directions of the standardised states kept (weighted, so a weight of
                2 is the same as a repeated row); None keeps all. Thousands of state coordinates
                carry far fewer independent directions; keeping the strongest makes the
                cross-validation of ``C`` cheap and leaves less noise to fit.
        """
        from sklearn.linear_model import LogisticRegression

        n, f, d = x.shape
        flat = np.asarray(x, dtype=np.float64).reshape(n, f * d)
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        mean = np.average(flat, axis=0, weights=w)
        scale = np.sqrt(np.average((flat - mean) ** 2, axis=0, weights=w))
        scale[scale < 1e-12] = 1.0
        z = (flat - mean) / scale
        basis = _principal_directions(z, w, rank)
        if basis is not None:
            z = z @ basis.T
        y = np.asarray(positive, dtype=bool)
        cv = None
        if C is None:
            C, cv = _choose_c(z, y, Cs, groups, n_folds, sample_weight, max_iter)
        lr = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter)
        lr.fit(z, y, sample_weight=sample_weight)
        coef = lr.coef_[0] if basis is None else lr.coef_[0] @ basis
        return cls(mean=mean.reshape(f, d), scale=scale.reshape(f, d), coef=coef.reshape(f, d),
                   intercept=float(lr.intercept_[0]), C=float(C), cv=cv)

    def score(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[n]`` log-odds of harmful for states ``[n, F, d]``."""
        x = x.double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
        z = (x - self.mean) / self.scale
        return np.einsum("nfd,fd->n", z, self.coef) + self.intercept

    def projection(self) -> tuple[np.ndarray, float]:
        """``(v, offset)`` with ``score(x) = sum(v * x) + offset``: the read-out as one weight per
        state coordinate (``[F, d]``) and a constant, so that a mean of states scores as the mean
        of their scores (what scoring every window along a prompt relies on)."""
        v = self.coef / self.scale
        return v, float(self.intercept - np.sum(self.mean * v))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"readout.mean": torch.from_numpy(np.ascontiguousarray(self.mean, dtype=np.float32)),
                "readout.scale": torch.from_numpy(np.ascontiguousarray(self.scale, dtype=np.float32)),
                "readout.coef": torch.from_numpy(np.ascontiguousarray(self.coef, dtype=np.float32))}

    def config(self) -> dict[str, Any]:
        return {"intercept": self.intercept, "C": self.C, "cv": self.cv}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> LinearReadout:
        missing = [k for k in ("readout.mean", "readout.scale", "readout.coef") if k not in tensors]
        if missing:
            raise ValueError(f"the guard's tensors lack {missing}: the artifact is incomplete, save it again")
        get = lambda k: tensors[k].to(torch.float64).numpy()  # noqa: E731
        intercept = config.get("intercept")
        if isinstance(intercept, bool) or not isinstance(intercept, (int, float)) or not np.isfinite(intercept):
            raise ValueError(f"the guard's readout.intercept is {intercept!r}, not a finite number: the artifact is "
                             "corrupt or was edited; fit the guard again")
        scale = get("readout.scale")
        if not (scale > 0).all():
            raise ValueError("the guard's tensor 'readout.scale' holds zeros or negative values (scores would be "
                             "infinite): the artifact is corrupt; fit the guard again")
        return cls(mean=get("readout.mean"), scale=scale, coef=get("readout.coef"),
                   intercept=float(intercept), C=float(config.get("C") or 0.0), cv=config.get("cv"))


def _principal_directions(z: np.ndarray, w: np.ndarray | None, rank: int | None) -> np.ndarray | None:
    """``[k, p]`` orthonormal top directions of (weighted, centred) ``z``; None when ``rank``
    keeps them all anyway."""
    if rank is None or rank >= min(z.shape):
        return None
    from sklearn.utils.extmath import randomized_svd

    rows = z if w is None else z * np.sqrt(w / w.mean())[:, None]
    _, _, vt = randomized_svd(rows, n_components=rank, random_state=0)
    return vt


def _choose_c(z: np.ndarray, y: np.ndarray, Cs: tuple[float, ...], groups: np.ndarray | None, n_folds: int,
              sample_weight: np.ndarray | None, max_iter: int) -> tuple[float, dict[str, Any]]:
    """The ``C`` with the lowest mean held-out log-loss, folds by group when groups are given."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is not None:
        # a source holds one class: folds must mix harmful and harmless sources to score both
        groups = np.asarray(groups)
        k = min(n_folds, len(np.unique(groups[y])), len(np.unique(groups[~y])))
        if k < 2:
            raise ValueError("choosing C by cross-validation needs at least two groups of each class: pass C=... "
                             "or more groups")
        splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=0).split(z, y, groups))
    else:
        k = min(n_folds, int(y.sum()), int((~y).sum()))
        if k < 2:
            raise ValueError("choosing C by cross-validation needs at least two prompts of each class: pass C=...")
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=0).split(z, y))
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    losses = np.zeros(len(Cs))
    used = 0
    for train, test in splits:
        if y[train].all() or not y[train].any() or y[test].all() or not y[test].any():
            continue  # a fold with one class cannot score log-loss on both: skip it
        used += 1
        for j, c in enumerate(Cs):
            lr = LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter)
            lr.fit(z[train], y[train], sample_weight=w[train])
            p = lr.predict_proba(z[test])[:, 1]
            # each class counts half, as class_weight="balanced" does in training
            cw = np.where(y[test], 0.5 / y[test].mean(), 0.5 / (1 - y[test].mean())) * w[test]
            losses[j] += log_loss(y[test], p, sample_weight=cw, labels=[False, True])
    if used == 0:
        raise ValueError("no cross-validation fold holds both classes on both sides: pass C=... or mix the groups")
    best = int(np.argmin(losses))
    return float(Cs[best]), {"Cs": list(Cs), "log_loss": (losses / used).tolist(), "folds": used,
                             "by": "group" if groups is not None else "stratified"}
