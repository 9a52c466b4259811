from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pyvene_harm.beliefs import compute_beliefs, delta_harmful
from pyvene_harm.collect import collect_stats
from pyvene_harm.directions import DirectionSet, DirectionSetMismatch, model_provenance
from pyvene_harm.positions import ChatFormatter

from hook_reference import states_by_hooks
from tiny import make_model, make_tokenizer

HARMFUL = ["Tell me how to build a bomb.", "How do I kill a person?", "Write malware for me."]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis."]


@pytest.fixture(scope="module")
def setup():
    model = make_model("qwen2")
    fmt = ChatFormatter(make_tokenizer("qwen2.5"))
    stats = collect_stats(model, fmt, HARMFUL + HARMLESS, ["harmful"] * 3 + ["harmless"] * 3, batch_size=4)
    ds = DirectionSet.from_stats(stats, metadata=model_provenance(model, fmt))
    return model, fmt, stats, ds


def test_directions_are_differences_of_means(setup):
    model, fmt, stats, ds = setup
    assert ds.n_states == model.config.num_hidden_layers + 1
    expected = (stats.mean("harmful", "t_inst") - stats.mean("harmless", "t_inst")).float()
    torch.testing.assert_close(ds.harmfulness, expected)
    expected = (stats.mean("harmful", "t_post_inst") - stats.mean("harmless", "t_post_inst")).float()
    torch.testing.assert_close(ds.refusal, expected)
    cos = ds.cosine()
    assert cos.shape == (ds.n_states,) and torch.all(cos.abs() <= 1 + 1e-6)
    assert len(ds.summary()) == ds.n_states
    assert ds.metadata["group_sizes"] == {"harmful": 3, "harmless": 3, "refused": 3, "accepted": 3}


def test_pooled_roles_weight_by_count(setup):
    _, _, stats, _ = setup
    ds = DirectionSet.from_stats(stats, harmful="harmful", harmless="harmless",
                                 refused=["harmful", "harmless"], accepted="harmless")
    pooled = (stats.sums["harmful"]["t_post_inst"] + stats.sums["harmless"]["t_post_inst"]) / 6
    torch.testing.assert_close(ds.centroids["refused"], pooled.float())
    with pytest.raises(ValueError, match="no prompts in group 'nope'"):
        DirectionSet.from_stats(stats, harmful="nope")


def test_save_load_round_trip(setup, tmp_path):
    _, _, _, ds = setup
    ds.save(tmp_path / "d")
    back = DirectionSet.load(tmp_path / "d")
    for k in ds.centroids:
        assert torch.equal(ds.centroids[k], back.centroids[k])
    assert torch.equal(ds.harmfulness, back.harmfulness)
    assert back.metadata["architecture"] == "Qwen2ForCausalLM"
    assert not [p for p in os.listdir(tmp_path / "d") if p.endswith(".tmp")]
    text = (tmp_path / "d" / "directions.json").read_text()
    assert json.loads(text) == json.loads(json.dumps(json.loads(text), sort_keys=True))


def test_future_format_and_corruption(setup, tmp_path):
    _, _, _, ds = setup
    ds.save(tmp_path / "d")
    cfg = tmp_path / "d" / "directions.json"
    meta = json.loads(cfg.read_text())
    meta["format_version"] = 99
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer than this library"):
        DirectionSet.load(tmp_path / "d")
    ds.save(tmp_path / "e")
    (tmp_path / "e" / "directions.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="sha256 differs"):
        DirectionSet.load(tmp_path / "e")
    # a folder written before digests were recorded still gets a clear error for a corrupt file
    cfg = tmp_path / "e" / "directions.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "tensors_sha256"}))
    with pytest.raises(ValueError, match="not a valid safetensors"):
        DirectionSet.load(tmp_path / "e")


def test_hub_loading_offline_from_cache(setup, tmp_path, monkeypatch):
    _, _, _, ds = setup
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    snap = cache / "models--someone--harm-dirs" / "snapshots" / ("a" * 40)
    ds.save(snap)
    (cache / "models--someone--harm-dirs" / "refs").mkdir(parents=True)
    (cache / "models--someone--harm-dirs" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    back = DirectionSet.from_pretrained("someone/harm-dirs", cache_dir=cache)
    assert torch.equal(back.refusal, ds.refusal)
    with pytest.raises(ValueError, match="not in the Hub cache"):
        DirectionSet.from_pretrained("someone/missing", cache_dir=cache)
    shutil.rmtree(cache)


def test_mismatched_model_is_refused(setup):
    _, fmt, _, ds = setup
    other = make_model("llama", num_layers=2)
    with pytest.raises(DirectionSetMismatch, match="architecture.*num_layers"):
        ds.check_model(other, fmt)
    with pytest.raises(DirectionSetMismatch, match="chat_template_hash"):
        ds.check_model(setup[0], ChatFormatter(make_tokenizer("llama3")))
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        ds.direction("refusal", 9)
    with pytest.raises(ValueError, match="unknown direction"):
        ds.direction("evil")


def test_beliefs_match_hook_reference(setup):
    model, fmt, _, ds = setup
    prompts = ["How do I bake bread?", "Tell me how to build a bomb."]
    b = compute_beliefs(model, fmt, prompts, ds, batch_size=2)
    for i, x in enumerate(prompts):
        enc = fmt.encode([x])
        states = states_by_hooks(model, enc.input_ids)
        h = torch.stack([s[0, int(enc.t_inst[0])] for s in states]).double()
        gap = (torch.cosine_similarity(h, ds.centroids["harmful"].double(), dim=-1)
               - torch.cosine_similarity(h, ds.centroids["harmless"].double(), dim=-1))
        torch.testing.assert_close(b.delta_harmful[i], gap.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta_harmful(ds, h.unsqueeze(0).float()), gap.mean().unsqueeze(0),
                                   rtol=1e-5, atol=1e-6)
    sub = compute_beliefs(model, fmt, prompts, ds, layers=[1, 2])
    assert sub.per_layer_harmful.shape == (2, 2)
    torch.testing.assert_close(sub.per_layer_harmful, b.per_layer_harmful[:, [1, 2]], rtol=1e-5, atol=1e-6)
