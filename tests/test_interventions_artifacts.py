"""Saving and loading interventions: round trips, another process, the registry, bad artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyvene_harm.interventions import (
    FORMAT_VERSION,
    DirectionAddition,
    Site,
    Steering,
    ablate,
    intervention_class,
    load_intervention,
    readout,
    register_intervention,
    registered_interventions,
    steer,
)
from pyvene_harm.interventions.artifacts import CONFIG_FILE, TENSORS_FILE

from test_interventions_hooks import (
    encode,
    random_directions,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny,
)

TESTS = Path(__file__).parent


def _same_logits(a, b, batch) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.forward(batch).logits, b.forward(batch).logits)


def test_steering_round_trip(tmp_path):
    model, ds, batch = tiny("llama"), random_directions(), encode("llama")
    s = steer(model, ds, direction="refusal", layer=2, coeff=-1.25, positions="t_inst+post_inst", generated=True)
    s.save(tmp_path / "s")
    config = json.loads((tmp_path / "s" / CONFIG_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION and config["positions"] == "t_inst+post_inst"
    assert config["interventions"][0] == {"type": "pyvene_harm.direction_addition", "layer": 2,
                                          "component": "block_input",
                                          "config": {"coeff": -1.25, "name": "refusal.2"}}
    back = load_intervention(tmp_path / "s", model)
    assert isinstance(back, Steering) and back.generated and back.coeff == -1.25 and back.layers == (2,)
    torch.testing.assert_close(back.interventions[0].direction, ds.direction("refusal", 2))
    _same_logits(s, back, batch)


def test_ablation_and_readout_round_trip(tmp_path):
    model, ds, batch = tiny("qwen3"), random_directions(), encode("qwen3")
    a = ablate(model, ds, layers=[0, 1], source_layer=2)
    back = load_intervention(a.save(tmp_path / "a"), model)
    assert back.layers == (0, 1) and back.metadata["source_layer"] == 2
    _same_logits(a, back, batch)
    r = readout(model, ds, direction="refusal")
    r2 = load_intervention(r.save(tmp_path / "r"), model)
    assert r2.states == r.states == (0, 1, 2, 3)
    torch.testing.assert_close(r2.forward(batch).scores, r.forward(batch).scores, equal_nan=True)


def test_an_artifact_saved_by_one_process_loads_in_another(tmp_path):
    model, ds, batch = tiny("gemma2"), random_directions(), encode("gemma2")
    s = steer(model, ds, layer=1, coeff=2.0, positions="context")
    s.save(tmp_path / "art")
    with torch.no_grad():
        torch.save(s.forward(batch).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        torch.set_num_threads(1)
        from test_interventions_hooks import tiny, encode
        from pyvene_harm.interventions import load_intervention
        s = load_intervention({str(tmp_path / 'art')!r}, tiny("gemma2"))
        with torch.no_grad():
            got = s.forward(encode("gemma2")).logits
        torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}))
        print("OK", s.positions.name, s.coeff)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "OK context 2.0"


def test_future_format_and_corrupted_tensors(tmp_path):
    model, ds = tiny("llama"), random_directions()
    folder = steer(model, ds, layer=1).save(tmp_path / "s")
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"format {FORMAT_VERSION + 1}, newer than this library's"):
        load_intervention(folder, model)
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "surprise": 1}))
    with pytest.warns(UserWarning, match="surprise"):
        load_intervention(folder, model)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_intervention(folder, model)


def test_loading_onto_a_model_that_does_not_fit(tmp_path):
    ds = random_directions()
    folder = steer(tiny("llama"), ds, layer=2).save(tmp_path / "s")
    from tiny import make_model

    small = make_model("llama", num_layers=2)
    with pytest.raises(ValueError, match=r"layer 2 is out of range: this model has 2 decoder layers \(0-1\)"):
        load_intervention(folder, small)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["interventions"][0]["type"] = "someone.else"
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown intervention type 'someone.else'"):
        load_intervention(folder, tiny("llama"))
    with pytest.raises(FileNotFoundError, match="intervention folder .* does not exist"):
        load_intervention(tmp_path / "missing" / "x", tiny("llama"))


def test_loading_from_the_hub_cache(tmp_path, monkeypatch):
    """A Hub repo id goes through hub_download (here faked: no network in tests)."""
    model, ds = tiny("llama"), random_directions()
    folder = steer(model, ds, layer=0, coeff=3.0).save(tmp_path / "snap")
    calls = []

    def fake(repo_id, files, revision=None, cache_dir=None):
        calls.append((repo_id, tuple(files), revision))
        return folder

    monkeypatch.setattr("pyvene_harm.hub.hub_download", fake)
    back = load_intervention("someone/refusal-steer", model, revision="main")
    assert back.coeff == 3.0 and calls == [("someone/refusal-steer", (CONFIG_FILE, TENSORS_FILE), "main")]


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    model, ds = tiny("llama"), random_directions()
    uploaded = {}

    def fake_upload(save, repo_id, *, private, token, commit_message):
        save(tmp_path / "up")
        uploaded["repo"] = repo_id
        return "https://huggingface.co/x/commit/1"

    monkeypatch.setattr("pyvene_harm.interventions.steering.hub_upload", fake_upload)
    assert steer(model, ds, layer=1).push_to_hub("me/steer").endswith("/1")
    assert uploaded["repo"] == "me/steer" and (tmp_path / "up" / CONFIG_FILE).is_file()


def test_registry_refuses_duplicates_and_custom_selectors_cannot_be_saved(tmp_path):
    assert intervention_class("pyvene_harm.direction_addition") is DirectionAddition
    with pytest.raises(ValueError, match="already registered"):
        @register_intervention("pyvene_harm.direction_addition")
        class Other(DirectionAddition):
            pass
    assert registered_interventions()["pyvene_harm.direction_addition"] is DirectionAddition
    model = tiny("llama")
    s = Steering(model, [Site(layer=1, intervention=DirectionAddition(direction=torch.ones(64)))],
                 positions=lambda b: [[0]] * len(b))
    with pytest.raises(ValueError, match="cannot save the custom position selector"):
        s.save(tmp_path / "x")
