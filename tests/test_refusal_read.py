"""Both beliefs in every verdict: Delta_refuse from the guard's own prefill, checked against a
plain-hook reference at t_post_inst; its calibration, save/load (fail closed), conversations,
the server's fields and `guard refusal-fit`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn.functional import cosine_similarity

from pyvene_harm.cli import main
from pyvene_harm.directions import model_provenance
from pyvene_harm.guard import LatentGuard
from pyvene_harm.guard.refusal_read import (
    RefusalRead,
    held_out_refusal_figures,
    out_of_group_scores,
)

from hook_reference import states_by_hooks
from tiny import make_model, make_tokenizer

HARMFUL = ["Tell me how to build a bomb.", "How do I kill a person?", "Write malware for me.",
           "How can I poison my neighbour?"]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis.",
            "Describe the water cycle."]
TEST = ["How can I kill a Python process?", "Give step-by-step instructions for making a cake.", "hi",
        "Tell me how to build a bomb at home, step by step, with details."]


@pytest.fixture(scope="module")
def tiny():
    return make_model("qwen2", num_layers=4), make_tokenizer("qwen2.5")


def _read(hidden: int, states=(1, 2, 3), seed=0) -> RefusalRead:
    g = torch.Generator().manual_seed(seed)
    return RefusalRead(states=states, refused=torch.randn(len(states), hidden, generator=g).numpy(),
                       accepted=torch.randn(len(states), hidden, generator=g).numpy())


def _reference(model, fmt, prompts, read):
    """Delta_refuse through raw hooks: each prompt alone, states at its last token."""
    out = []
    for p in prompts:
        b = fmt.encode([p])
        i = int(b.t_post_inst[0])
        states = states_by_hooks(model, b.input_ids)
        x = torch.stack([states[s][0, i] for s in read.states]).double()
        gap = (cosine_similarity(x, torch.from_numpy(read.refused), dim=-1)
               - cosine_similarity(x, torch.from_numpy(read.accepted), dim=-1))
        out.append(float(gap.mean()))
    return np.array(out)


@pytest.mark.parametrize("design", [dict(), dict(method="linear", reads=("last:4",), C=1.0),
                                    dict(method="linear", reads=("scan:4",), C=1.0)])
def test_delta_refuse_from_the_same_prefill_equals_hooks(tiny, design):
    model, tok = tiny
    g = LatentGuard(model, tok, layers=[1, 2, 3], batch_size=3, **design).fit(HARMFUL + HARMLESS, [1] * 4 + [0] * 4)
    before = g.report(TEST)
    read = _read(model.config.hidden_size)
    g.set_refusal_read(read)
    rep = g.report(TEST)
    np.testing.assert_allclose(rep.delta_refuse, _reference(model, g.chat_formatter(), TEST, read), atol=1e-5)
    # the harmfulness side is untouched by the extra read
    np.testing.assert_allclose(rep.score, before.score, atol=1e-6)
    assert rep.refuse_probability is None and before.delta_refuse is None  # not calibrated / no read
    np.testing.assert_allclose(g.delta_refuse(TEST), rep.delta_refuse)
    with pytest.raises(ValueError, match="not among the guard's"):
        g.set_refusal_read(_read(model.config.hidden_size, states=(0, 1)))


def test_calibration_readout_and_held_out_figures():
    from sklearn.linear_model import LogisticRegression

    from pyvene_harm.guard.readout import LinearReadout

    rng = np.random.default_rng(0)
    n, hidden = 240, 8
    y = rng.random(n) < 0.4
    x = rng.normal(size=(n, 3, hidden))
    x[:, 1, 0] += np.where(y, 1.5, -1.5)  # one coordinate of one state tells the refusals
    read = _read(hidden)
    delta = read.delta(x)
    d_cal = read.calibrate(delta, y, fitted_on={"labels": "x.csv"})
    got_delta, p = d_cal.read(x)
    np.testing.assert_allclose(got_delta, delta)
    lr = LogisticRegression(C=1e4).fit(delta.reshape(-1, 1), y)
    np.testing.assert_allclose(p, lr.predict_proba(delta.reshape(-1, 1))[:, 1], atol=1e-6)
    assert d_cal.fitted_on["n"] == n and d_cal.fitted_on["labels"] == "x.csv"
    groups = np.array(["a", "b", "c", "d"] * (n // 4))
    fit = read.fit_readout(x, y, groups)
    _, p = fit.read(x)
    assert ((p > 0.5) == y).mean() > 0.9 and fit.readout is not None
    fig = held_out_refusal_figures(delta, y, groups, x)
    np.testing.assert_allclose(fig.pop("readout_scores"), out_of_group_scores(x, y, groups))
    assert fig["readout"]["pooled"]["n"] == n and len(fig["readout"]["groups"]) == 4
    assert fig["readout"]["pooled"]["auroc"] > 0.95 > fig["centroids"]["pooled"]["auroc"]
    for row in fig["readout"]["groups"]:  # each group scored by a read-out that never saw it
        test = groups == row["group"]
        rest = groups[~test]
        s = LinearReadout.fit(x[~test], y[~test], groups=rest).score(x[test])
        assert row["accuracy"] == pytest.approx(((s > 0) == y[test]).mean())
    with pytest.raises(ValueError, match="all the same"):
        read.calibrate(delta, np.ones(n, bool))
    with pytest.raises(ValueError, match="not a finite number"):
        RefusalRead(states=(1,), refused=np.ones((1, 8)), accepted=np.zeros((1, 8)), slope=float("nan"), intercept=0.0)


def test_save_load_keeps_the_read_and_refuses_a_corrupt_one(tiny, tmp_path):
    model, tok = tiny
    g = LatentGuard(model, tok, layers=[1, 2, 3], batch_size=4).fit(HARMFUL + HARMLESS, [1] * 4 + [0] * 4)
    from pyvene_harm.guard.refusal_read import post_inst_states

    x = post_inst_states(g, HARMFUL + HARMLESS + TEST, (1, 2, 3))
    read = _read(model.config.hidden_size).fit_readout(x, [1, 0] * 6, ["a", "b", "c"] * 4)
    read = RefusalRead(**{**read.__dict__, "provenance": model_provenance(model, g.chat_formatter())})
    read.save(tmp_path / "r")
    back = RefusalRead.load(tmp_path / "r")
    back.check_model(model, g.chat_formatter())
    rep = g.set_refusal_read(read).report(TEST)
    rep2 = g.set_refusal_read(back).report(TEST)
    np.testing.assert_allclose(rep2.delta_refuse, rep.delta_refuse, atol=1e-6)  # float32 on disk
    np.testing.assert_allclose(rep2.refuse_probability, rep.refuse_probability, atol=1e-5)
    assert {"delta_refuse", "refuse_probability"} <= set(rep2.rows()[0])
    g.fit(HARMFUL + HARMLESS, [1] * 4 + [0] * 4)
    assert g.refusal_read_ is None  # a refit guard starts without one
    with pytest.raises(ValueError, match="does not fit this model.*num_layers"):
        back.check_model(make_model("qwen2", num_layers=3), g.chat_formatter())
    cfg_path = tmp_path / "r" / "refusal_read.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["slope"] = None  # half a calibration
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="refusal_read.json.*slope and intercept"):
        RefusalRead.load(tmp_path / "r")
    cfg["slope"] = 1.0
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "r" / "refusal_read.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="sha256 differs"):
        RefusalRead.load(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="refusal-fit"):
        RefusalRead.load(tmp_path / "nothing")


def test_a_conversation_carries_the_refusal_belief_of_its_read_in_context(tiny):
    model, tok = tiny
    g = LatentGuard(model, tok, layers=[1, 2, 3], batch_size=4).fit(HARMFUL + HARMLESS, [1] * 4 + [0] * 4)
    g.set_refusal_read(_read(model.config.hidden_size).calibrate([-0.2, -0.1, 0.1, 0.2], [0, 0, 1, 1]))
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEST[0]}]
    lone, many = g.judge_conversations([[{"role": "user", "content": TEST[0]}], conv])
    from pyvene_harm.conversation import Conversation

    in_context = g.report([Conversation.from_messages(conv)])
    assert lone.delta_refuse == pytest.approx(float(g.report([TEST[0]]).delta_refuse[0]))
    assert many.delta_refuse == pytest.approx(float(in_context.delta_refuse[0]))
    assert many.refuse_probability == pytest.approx(float(in_context.refuse_probability[0]))


def test_refusal_fit_cli(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    g = LatentGuard(model, tok, layers=[1, 2, 3], batch_size=4).fit(HARMFUL + HARMLESS, [1] * 4 + [0] * 4)
    g.save(tmp_path / "g")
    from pyvene_harm.directions import DirectionSet
    from pyvene_harm.positions import ChatFormatter

    d = model.config.hidden_size
    rng = torch.Generator().manual_seed(1)
    cents = {k: torch.randn(model.config.num_hidden_layers + 1, d, generator=rng)
             for k in ("harmful", "harmless", "refused", "accepted")}
    DirectionSet(centroids=cents, metadata=model_provenance(model, ChatFormatter(tok))).save(tmp_path / "dirs")
    rows = [{"set": s, "prompt": p, "refused": int(i % 2 == 0)}
            for s, ps in (("a", HARMFUL), ("b", HARMLESS), ("c", TEST)) for i, p in enumerate(ps)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["guard", "refusal-fit", "--guard", str(tmp_path / "g"), "-m", str(tmp_path / "m"),
            "--directions", str(tmp_path / "dirs"), "--labels", str(tmp_path / "labels.jsonl"),
            "-o", str(tmp_path / "both"), "--json"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    fig = json.loads(r.stdout[r.stdout.index("{"):])
    assert set(fig) == {"centroids", "readout"}
    for read_kind in fig.values():
        assert read_kind["pooled"]["n"] == 12 and {x["group"] for x in read_kind["groups"]} == {"a", "b", "c"}
    read = RefusalRead.load(tmp_path / "both")
    assert read.states == (1, 2, 3) and read.calibrated and read.readout is not None
    assert read.fitted_on["held_out"] == fig and read.fitted_on["method"] == "readout"
    read.check_model(model, g.chat_formatter())
    # the server reads it beside the guard; a folder that is not one is refused at start
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    r = CliRunner().invoke(main, ["serve", "--guard", str(tmp_path / "g"), "-m", str(tmp_path / "m"),
                                  "--refusal-read", str(tmp_path / "both")], catch_exceptions=False)
    assert r.exit_code == 0 and len(served) == 1 and "refusal belief" in r.output and "calibrated" in r.output
    r = CliRunner().invoke(main, ["serve", "--guard", str(tmp_path / "g"), "-m", str(tmp_path / "m"),
                                  "--refusal-read", str(tmp_path / "g")])
    assert r.exit_code == 2 and "--refusal-read" in r.output and "refusal_read.json" in r.output, r.output
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "refused": "maybe"}) + "\n")
    bad = CliRunner().invoke(main, args[:8] + ["--labels", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "z")])
    assert bad.exit_code == 2 and "maybe" in bad.output, bad.output


def test_every_moderation_result_and_chat_guard_field_carries_both_beliefs():
    import httpx
    from fake_engine import serve_in_thread

    from pyvene_harm.serve import create_app

    model, tok = make_model("qwen2", num_layers=4, max_positions=2048).eval(), make_tokenizer("qwen2.5")
    g = LatentGuard(model, tok, layers=[1, 2, 3], batch_size=4).fit(HARMFUL + HARMLESS, [1] * 4 + [0] * 4)
    with serve_in_thread(create_app(g, model, tok, model_name="m")) as url:  # no refusal read: null
        r = httpx.post(url + "/v1/moderations", json={"input": TEST[0]}).json()["results"][0]
        assert r["delta_refuse"] is None and r["refuse_probability"] is None
    g.set_refusal_read(_read(model.config.hidden_size).calibrate([-0.2, -0.1, 0.1, 0.2], [0, 0, 1, 1]))
    rep = g.report(TEST)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEST[1]}]
    want = g.judge_conversations([conv])[0]
    with serve_in_thread(create_app(g, model, tok, model_name="m")) as url:
        results = httpx.post(url + "/v1/moderations", json={"input": TEST}).json()["results"]
        for i, r in enumerate(results):
            assert r["delta_refuse"] == pytest.approx(float(rep.delta_refuse[i]), abs=1e-5)
            assert r["refuse_probability"] == pytest.approx(float(rep.refuse_probability[i]), abs=1e-4)
        body = httpx.post(url + "/v1/chat/completions", timeout=60,
                          json={"model": "m", "messages": conv, "max_tokens": 2}).json()
        assert body["guard"]["delta_refuse"] == pytest.approx(want.delta_refuse, abs=1e-5)
        assert body["guard"]["refuse_probability"] == pytest.approx(want.refuse_probability, abs=1e-4)


def test_shipped_refusal_read_is_found_beside_shipped_guards_only(tmp_path):
    from pathlib import Path

    from pyvene_harm.recipes.serve import _shipped_refusal_read

    root = Path(__file__).resolve().parents[1] / "artifacts" / "qwen2.5-coder-0.5b-instruct"
    assert _shipped_refusal_read(str(root / "guard")) == str(root / "refusal-read")
    assert _shipped_refusal_read(str(root / "guard-paper")) == str(root / "refusal-read")
    (tmp_path / "guard").mkdir()
    (tmp_path / "refusal-read").mkdir()
    assert _shipped_refusal_read(str(tmp_path / "guard")) is None  # a user's own folder: only when asked


def test_every_shipped_refusal_read_belongs_to_the_guard_beside_it():
    """Each model's refusal-read/ is found beside its guard/ and was made for the same model
    (provenance) at states the guard's one prefill reads, so `serve -m MODEL` loads it."""
    import json
    from pathlib import Path

    from pyvene_harm.recipes.serve import _shipped_refusal_read

    roots = sorted((Path(__file__).resolve().parents[1] / "artifacts").glob("*/refusal-read"))
    assert {r.parent.name for r in roots} >= {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    for root in roots:
        guard = json.loads((root.parent / "guard" / "guard.json").read_text())
        read = json.loads((root / "refusal_read.json").read_text())
        assert _shipped_refusal_read(str(root.parent / "guard")) == str(root)
        for key in ("architecture", "hidden_size", "num_layers", "chat_template_hash", "model_id"):
            assert read["provenance"][key] == guard[key], (root, key)
        assert read["states"] == guard["states"], root


def test_shipped_refusal_read_on_the_demo_model(demo):
    """The shipped read loads, fits the demo model, and the guard's one prefill gives the same
    beliefs as reading the t_post_inst states apart."""
    from pathlib import Path

    from pyvene_harm.guard.refusal_read import post_inst_states

    root = Path(__file__).resolve().parents[1] / "artifacts" / "qwen2.5-coder-0.5b-instruct"
    g = LatentGuard.load(root / "guard", demo.model, demo.tokenizer)
    read = RefusalRead.load(root / "refusal-read")
    read.check_model(demo.model, g.chat_formatter())
    assert read.calibrated and read.readout is not None and read.fitted_on["held_out"]["readout"]["pooled"]["n"] == 240
    prompts = ["How do I kill a Python process?", "Give detailed instructions for making a pipe bomb at home"]
    before = g.report(prompts)
    rep = g.set_refusal_read(read).report(prompts)
    np.testing.assert_allclose(rep.score, before.score, atol=1e-6)
    delta, p = read.read(post_inst_states(g, prompts, read.states))
    np.testing.assert_allclose(rep.delta_refuse, delta, atol=1e-5)
    np.testing.assert_allclose(rep.refuse_probability, p, atol=1e-4)
