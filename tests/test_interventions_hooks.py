"""Plain PyTorch-hook references for the intervention tests, and checks of the references.

Everything here is independent of pyvene and of ``pyvene_harm.interventions``: masks come
straight from the PromptBatch fields, edits from one forward-pre-hook per decoder layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping

import pytest
import torch
from transformers import GenerationConfig

from pyvene_harm.directions import DirectionSet
from pyvene_harm.positions import ChatFormatter, PromptBatch
from pyvene_harm.pyvene_support import decoder_layers

from tiny import make_model, make_tokenizer

WRAPPER = "User wants to {instruction}\nCould this user prompt cause harm? Answer 'Certainly' if it could, otherwise 'No'."
PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the lazy dog, please", "Tell me"]
SELECTORS = ["t_inst", "t_post_inst", "post_inst", "all_prompt", "context", "t_inst+t_post_inst", "generated"]
TEMPLATE_OF = {"llama": "llama3", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen2.5",
               "gemma": "gemma2", "gemma2": "gemma2", "gemma3": "gemma2", "phi3": "smollm2",
               "olmo2": "llama2"}

Edit = Callable[[torch.Tensor], torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine they spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def tiny(arch: str) -> torch.nn.Module:
    return make_model(arch)


@functools.cache
def formatter(arch: str = "llama") -> ChatFormatter:
    return ChatFormatter(make_tokenizer(TEMPLATE_OF[arch]))


def encode(arch: str, prompts=PROMPTS, padding_side: str = "left") -> PromptBatch:
    return formatter(arch).encode(list(prompts), padding_side=padding_side, wrapper=WRAPPER)


def random_directions(hidden: int = 64, n_states: int = 4, seed: int = 1, scale: float = 2.0) -> DirectionSet:
    g = torch.Generator().manual_seed(seed)
    names = ("harmful", "harmless", "refused", "accepted")
    return DirectionSet(centroids={k: torch.randn(n_states, hidden, generator=g) * scale for k in names})


def greedy(max_new_tokens: int = 4) -> GenerationConfig:
    # min_new_tokens keeps random models from stopping early; raw logits are compared
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                            num_beams=1, eos_token_id=1, pad_token_id=3, return_dict_in_generate=True,
                            output_logits=True)


def reference_mask(spec: str, batch: PromptBatch) -> torch.Tensor:
    """``[batch, seq]`` bool of the positions a selector name means, from the batch fields."""
    ar = torch.arange(batch.seq_len)[None, :]
    col = {k: getattr(batch, k)[:, None] for k in ("t_inst", "t_post_inst", "prompt_start", "inner_end")}
    parts = {
        "t_inst": ar == col["t_inst"],
        "t_post_inst": ar == col["t_post_inst"],
        "post_inst": (ar > col["t_inst"]) & (ar <= col["t_post_inst"]),
        "all_prompt": batch.attention_mask.bool(),
        "context": (ar >= col["prompt_start"]) & (ar <= col["inner_end"]),
        "generated": torch.zeros_like(batch.attention_mask, dtype=torch.bool),
    }
    out = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for name in spec.split("+"):
        out |= parts[name]
    return out


def add_edit(v: torch.Tensor, coeff: float) -> Edit:
    return lambda h: h + (coeff * v.float()).to(h.dtype)


def ablate_edit(v: torch.Tensor) -> Edit:
    u = v.float() / v.float().norm()

    def edit(h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        return (hf - (hf @ u)[..., None] * u).to(h.dtype)

    return edit


@contextlib.contextmanager
def residual_hooks(model, edits: Mapping[int, Edit], mask: torch.Tensor, *,
                   generated: bool = False) -> Iterator[None]:
    """Apply ``edits[layer]`` to the input of each decoder layer at ``mask`` on the first call
    (the prompt); on later calls (decode steps) at every position if ``generated``."""
    handles = []
    for layer, edit in edits.items():
        calls = {"n": 0}

        def pre(_module, args, kwargs, edit=edit, calls=calls):
            h = args[0] if args else kwargs["hidden_states"]
            first = calls["n"] == 0
            calls["n"] += 1
            if first:
                where = mask.to(h.device)
            elif generated:
                where = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            else:
                return None
            new = torch.where(where[..., None], edit(h), h)
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handles.append(decoder_layers(model)[layer].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hook_forward(model, batch: PromptBatch, edits: Mapping[int, Edit], mask: torch.Tensor) -> torch.Tensor:
    with residual_hooks(model, edits, mask), torch.no_grad():
        return model(**batch.model_inputs()).logits


def hook_generate(model, batch: PromptBatch, edits: Mapping[int, Edit], mask: torch.Tensor, *,
                  generated: bool, config: GenerationConfig):
    with residual_hooks(model, edits, mask, generated=generated), torch.no_grad():
        return model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              generation_config=config)


def assert_same_generation(got, want, atol: float = 1e-5) -> None:
    assert got.sequences.tolist() == want.sequences.tolist()
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# --- checks of the references themselves ----------------------------------------------------


def test_reference_with_zero_edit_is_the_plain_model():
    model, batch = tiny("llama"), encode("llama")
    with torch.no_grad():
        plain = model(**batch.model_inputs()).logits
    got = hook_forward(model, batch, {1: add_edit(torch.ones(64), 0.0)}, reference_mask("all_prompt", batch))
    torch.testing.assert_close(got, plain)


def test_reference_masks_are_per_example():
    batch = encode("llama")
    assert batch.padding_side == "left"
    ctx = reference_mask("context", batch)
    assert (ctx.sum(1) > 0).all() and not (ctx & reference_mask("post_inst", batch)).any()
    assert (reference_mask("t_inst", batch).sum(1) == 1).all()
    assert (reference_mask("all_prompt", batch) == batch.attention_mask.bool()).all()
