"""scikit-learn's own estimator checks on the precomputed-feature mode of LatentGuard.

A 2-D numeric array is one state per row (``S = 1``); those are the inputs the checks feed.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from pyvene_harm.guard import LatentGuard


@parametrize_with_checks([LatentGuard(), LatentGuard(method="linear", C=1.0)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_works_in_sklearn_tooling():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 40)
    X = rng.normal(size=(80, 3, 5)) + 2.0
    X[:, :, 0] += np.where(y == 1, 3.0, -3.0)[:, None]
    guard = LatentGuard(layers=[4, 7, 9])
    assert cross_val_score(guard, X, y, cv=4).mean() > 0.9
    fitted = clone(guard).fit(X, y)
    assert fitted.states_ == (4, 7, 9) and fitted.n_features_in_ == 15
    flat = make_pipeline(StandardScaler(), LatentGuard()).fit(X.reshape(80, -1), y)
    assert flat.score(X.reshape(80, -1), y) > 0.9
    with pytest.raises(ValueError, match="names 3 states but X holds 2"):
        LatentGuard(layers=[4, 7, 9]).fit(X[:, :2], y)
    with pytest.raises(ValueError, match="do not split into n_states=4"):
        LatentGuard(n_states=4).fit(X.reshape(80, -1), y)
