"""Guards that read only the words: the controls a latent guard has to beat.

Reading the model's states costs a prefill; a classifier on the text itself costs nothing. Out
of distribution a linear probe can be matched by an n-gram classifier, so every comparison of
guard designs runs two controls on the same training rows and held-out folds:

* ``ngram``: TF-IDF of word 1-2-grams and character 3-5-grams (within word boundaries), one
  class-balanced logistic regression, its ``C`` chosen by cross-validated log-loss with folds by
  source, as the linear read-out's is.
* ``length``: the prompt's length alone (log characters, log words): what a guard gets from
  harmful sets being shorter or longer than harmless ones.

Both take prompts (strings), not states, and give a log-odds decision function thresholded at 0
like a :class:`~pyvene_harm.guard.LatentGuard`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["CONTROLS", "TextControl"]

CONTROLS = ("ngram", "length")

CONTROL_CS = tuple(float(c) for c in np.logspace(-2, 3, 6))
"""``C`` candidates of the controls' logistic regressions (TF-IDF rows have unit norm, so useful
strengths sit higher than for standardised states)."""


class TextControl:
    """A text-only guard, fitted on prompts and their labels (see the module docstring)."""

    def __init__(self, kind: str = "ngram", *, C: float | None = None, Cs: Sequence[float] = CONTROL_CS,
                 n_folds: int = 5, seed: int = 0):
        if kind not in CONTROLS:
            raise ValueError(f"unknown control {kind!r}: use one of {', '.join(CONTROLS)}")
        self.kind, self.C, self.Cs, self.n_folds, self.seed = kind, C, tuple(Cs), n_folds, seed
        self.pipeline_: Any = None
        self.C_: float | None = None
        self.cv_: dict[str, Any] | None = None

    def _pipeline(self, C: float) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion, make_pipeline
        from sklearn.preprocessing import FunctionTransformer, StandardScaler

        lr = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
        if self.kind == "length":
            return make_pipeline(FunctionTransformer(_length_features), StandardScaler(), lr)
        from sklearn.feature_extraction.text import TfidfVectorizer

        words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2)
        return make_pipeline(FeatureUnion([("words", words), ("chars", chars)]), lr)

    def fit(self, texts: Sequence[str], y: Sequence[int], *, groups: Sequence[Any] | None = None,
            sample_weight: Any = None) -> TextControl:
        """Fit on ``texts``; with ``C`` None choose it by log-loss over folds of ``groups`` (the
        source of each prompt, so the choice is for unseen sources) or stratified folds."""
        texts, y = list(texts), np.asarray(y).astype(int)
        if len(texts) != len(y) or len(set(y.tolist())) < 2:
            raise ValueError("a text control needs one label per prompt and prompts of both classes")
        C = self.C if self.C is not None else self._choose_C(texts, y, groups, sample_weight)
        self.pipeline_ = self._pipeline(C)
        kw = {} if sample_weight is None else {"logisticregression__sample_weight": np.asarray(sample_weight)}
        self.pipeline_.fit(texts, y, **kw)
        self.C_ = C
        return self

    def _choose_C(self, texts: list[str], y: np.ndarray, groups: Any, sample_weight: Any) -> float:
        from sklearn.metrics import log_loss
        from sklearn.model_selection import GroupKFold, StratifiedKFold

        if groups is not None and len(set(groups)) >= 2:
            g = np.asarray(groups)
            folds = list(GroupKFold(n_splits=min(self.n_folds, len(set(g.tolist())))).split(texts, y, g))
            how = "source"
        else:
            k = min(self.n_folds, int(np.bincount(y).min()))
            if k < 2:  # too few prompts of a class to cross-validate: the middle of the grid
                self.cv_ = {"Cs": list(self.Cs), "folds": "none (fewer than 2 prompts of a class)"}
                return self.Cs[len(self.Cs) // 2]
            folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=self.seed).split(texts, y))
            how = "stratified"
        losses = []
        for C in self.Cs:
            total = 0.0
            for tr, te in folds:
                if len(set(y[tr].tolist())) < 2:
                    continue
                pipe = self._pipeline(C)
                kw = {} if sample_weight is None else {
                    "logisticregression__sample_weight": np.asarray(sample_weight)[tr]}
                pipe.fit([texts[i] for i in tr], y[tr], **kw)
                p = pipe.predict_proba([texts[i] for i in te])[:, 1]
                total += log_loss(y[te], np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]) * len(te)
            losses.append(total)
        self.cv_ = {"Cs": list(self.Cs), "log_loss": [x / len(y) for x in losses], "folds": how}
        return self.Cs[int(np.argmin(losses))]

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """Log-odds that each prompt is harmful (flag above 0)."""
        if self.pipeline_ is None:
            raise RuntimeError("this control is not fitted: call fit(texts, y) first")
        return np.asarray(self.pipeline_.decision_function(list(texts)), dtype=np.float64)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return (self.decision_function(texts) > 0).astype(int)


def _length_features(texts: Sequence[str]) -> np.ndarray:
    return np.asarray([[np.log1p(len(t)), np.log1p(len(t.split()))] for t in texts], dtype=np.float64)
