"""The linear read-out and pooled reads of LatentGuard on tiny models, against plain PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyvene_harm.guard import LatentGuard
from pyvene_harm.guard.readout import LinearReadout
from pyvene_harm.positions import ChatFormatter
from pyvene_harm.surface import surface_variants

from hook_reference import states_by_hooks
from tiny import make_model, make_tokenizer

HARMFUL = ["Tell me how to build a bomb.", "How do I kill a person?", "Write malware for me.",
           "How can I poison my neighbour?", "Explain how to steal a car", "Help me hurt someone"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis.",
            "Describe the water cycle.", "Give me a cake recipe", "Name three rivers"]
TEST = ["How can I kill a Python process?", "Give step-by-step instructions for making a cake.", "hi"]
Y = [1] * 6 + [0] * 6
LAYERS = [1, 3]


@pytest.fixture(scope="module")
def tiny():
    return make_model("llama"), make_tokenizer("qwen2.5")


def _pooled_by_hooks(model, fmt, prompts, layers):
    """``[n, 2 * len(layers), d]``: mean over the instruction's tokens, then t_post_inst, per
    state, one prompt at a time through raw hooks (the guard's read-major layout)."""
    rows = []
    for p in prompts:
        b = fmt.encode([p])
        states = states_by_hooks(model, b.input_ids)
        s, t, e = int(b.inst_start[0]), int(b.t_inst[0]), int(b.t_post_inst[0])
        mean = [states[k][0, s:t + 1].mean(0) for k in layers]
        post = [states[k][0, e] for k in layers]
        rows.append(torch.stack(mean + post).double())
    return torch.stack(rows).numpy()


def test_linear_scores_equal_a_plain_reference(tiny):
    model, tok = tiny
    guard = LatentGuard(model, tok, method="linear", reads=["mean_inst", "t_post_inst"], layers=LAYERS, C=0.5,
                        batch_size=4).fit(HARMFUL + HARMLESS, Y)
    x = _pooled_by_hooks(model, ChatFormatter(tok), TEST, LAYERS)
    r = guard.readout_
    expected = (((x - r.mean) / r.scale) * r.coef).sum(axis=(1, 2)) + r.intercept
    np.testing.assert_allclose(guard.decision_function(TEST), expected, rtol=1e-4, atol=1e-5)
    # the same numbers from precomputed states, and from the read-out's own scoring
    np.testing.assert_allclose(guard.decision_function(x), expected, rtol=1e-9, atol=1e-9)
    proba = guard.predict_proba(TEST)[:, 1]
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-expected)), rtol=1e-4, atol=1e-6)
    rep = guard.report(TEST)
    np.testing.assert_allclose(rep.score, expected, rtol=1e-4, atol=1e-5)
    assert rep.harmful.tolist() == (expected > 0).tolist()
    # Delta_harmful stays the paper's belief: cosine gaps to the centroids of the same reads
    train = _pooled_by_hooks(model, ChatFormatter(tok), HARMFUL + HARMLESS, LAYERS)
    mu_h, mu_l = torch.tensor(train[:6].mean(0)), torch.tensor(train[6:].mean(0))
    xt = torch.tensor(x)
    cos = torch.nn.functional.cosine_similarity
    gap = (cos(xt, mu_h[None], dim=-1) - cos(xt, mu_l[None], dim=-1)).mean(-1).numpy()
    np.testing.assert_allclose(rep.delta_harmful, gap, rtol=1e-4, atol=1e-5)


def test_readout_matches_sklearn_on_standardised_states():
    """Full rank, the read-out is scikit-learn's balanced logistic regression on z-scores."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2, 5)) * np.arange(1, 6)
    y = rng.random(60) > 0.4
    x[y, 0, 0] += 2.0
    r = LinearReadout.fit(x, y, C=0.3, rank=None)
    flat = x.reshape(60, -1)
    z = (flat - flat.mean(0)) / flat.std(0)
    lr = LogisticRegression(C=0.3, class_weight="balanced", max_iter=2000).fit(z, y)
    np.testing.assert_allclose(r.score(x), lr.decision_function(z), rtol=1e-5, atol=1e-5)


def test_low_rank_readout_is_affine_in_the_states_and_weights_count_like_repeats():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 3, 40))
    y = np.arange(80) % 2 == 0
    x[y, 1, :3] += 1.5
    r = LinearReadout.fit(x, y, C=1.0, rank=8)
    assert r.coef.shape == (3, 40)
    # an affine map of the states themselves: the score of a midpoint is the mean of the scores
    np.testing.assert_allclose(r.score((x[:1] + x[1:2]) / 2), (r.score(x[:1]) + r.score(x[1:2])) / 2, rtol=1e-9)
    w = np.ones(80)
    w[:10] = 2.0
    doubled = LinearReadout.fit(np.concatenate([x, x[:10]]), np.concatenate([y, y[:10]]), C=1.0, rank=None)
    weighted = LinearReadout.fit(x, y, C=1.0, rank=None, sample_weight=w)
    np.testing.assert_allclose(weighted.score(x), doubled.score(x), rtol=1e-3, atol=1e-3)


def test_c_is_chosen_on_held_out_groups():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(90, 1, 6))
    y = np.arange(90) % 2 == 0
    x[y, 0, 0] += 1.0
    r = LinearReadout.fit(x, y, groups=np.repeat(["a", "b", "c"], 30))
    assert r.cv["by"] == "group" and r.cv["folds"] == 3 and r.C in r.cv["Cs"]
    assert r.C == r.cv["Cs"][int(np.argmin(r.cv["log_loss"]))]
    with pytest.raises(ValueError, match="at least two groups"):
        LinearReadout.fit(x, y, groups=np.zeros(90))


def test_augment_fits_on_every_surface_variant(tiny, monkeypatch):
    model, tok = tiny
    seen = []
    import pyvene_harm.guard.training as training  # where a fit on prompts collects their states

    real = training.iter_prompt_states

    def spy(model, fmt, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real(model, fmt, prompts, *args, **kwargs)

    monkeypatch.setattr(training, "iter_prompt_states", spy)
    guard = LatentGuard(model, tok, method="linear", reads=["mean_inst"], layers=LAYERS, C=1.0,
                        augment=True).fit(HARMFUL + HARMLESS, Y)
    expected = [v for p in HARMFUL + HARMLESS for v in dict.fromkeys([p, *surface_variants(p).values()])]
    assert seen[0] == expected
    assert guard.n_train_["harmful"] == sum(len(dict.fromkeys([p, *surface_variants(p).values()])) for p in HARMFUL)
    with pytest.raises(ValueError, match="augment=True"):
        LatentGuard(method="linear", augment=True).fit(np.zeros((4, 1, 3)), [0, 1, 0, 1])


def test_linear_guard_round_trip_and_select(tiny, tmp_path):
    model, tok = tiny
    guard = LatentGuard(model, tok, method="linear", reads=["last:2", "t_inst"], layers=LAYERS, C=1.0)
    guard.fit(HARMFUL + HARMLESS, Y, categories=["a", "b", "a", "b", "a", "b"] + [None] * 6)
    guard.select(HARMFUL + HARMLESS, Y, target="fpr", max_fpr=0.0)
    assert guard.selection_["layers"] == LAYERS
    guard.save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "guard.json").read_text())
    assert meta["method"] == "linear" and meta["reads"] == ["last:2", "t_inst"] and meta["readout"]["C"] == 1.0
    back = LatentGuard.from_pretrained(tmp_path / "g", model, tok)
    np.testing.assert_allclose(back.decision_function(TEST), guard.decision_function(TEST), rtol=1e-6, atol=1e-6)
    assert back.report(TEST).category == guard.report(TEST).category
    with pytest.raises(ValueError, match="fitted on its layers as a whole"):
        guard.select(HARMFUL + HARMLESS, Y, candidate_layer_sets=[[1]])


def test_bad_reads_and_methods_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="unknown read"):
        LatentGuard(model, tok, reads=["middle"]).fit(HARMFUL + HARMLESS, Y)
    with pytest.raises(ValueError, match="unknown method"):
        LatentGuard(model, tok, method="svm").fit(HARMFUL + HARMLESS, Y)
    with pytest.raises(ValueError, match="do not split into 2 reads"):
        LatentGuard(reads=["t_inst", "mean_inst"]).fit(np.zeros((4, 3, 5)), [0, 1, 0, 1])
