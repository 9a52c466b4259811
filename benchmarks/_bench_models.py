"""The benchmarks' models: the real demo model, or full-size architectures with random weights
(the cost of a forward does not depend on the weights) and an in-memory tokenizer for them.

Imported through ``_common`` (``benchmarks/`` is not a package: scripts import from their folder).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from _bench_prompts import _FALLBACK_HARMFUL, _FALLBACK_HARMLESS, advbench_prompts, alpaca_prompts

__all__ = ["FULL_SIZE", "MODEL_CHOICES", "BenchModel", "bench_tokenizer", "load_bench_model"]


# Chat templates of the families whose full-size configs we build (copied from their
# published tokenizer_config.json files), for the in-memory benchmark tokenizer.
_TEMPLATES = {
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "qwen2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}
_EOS = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "llama2": "</s>"}
_BOS = {"llama3": "<|begin_of_text|>", "qwen2": "<s>", "llama2": "<s>"}
_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]

# Architectures of the full-size models (weights are random: they do not change the cost).
FULL_SIZE = {
    "llama3-8b": ("LlamaConfig", "llama3", dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2-7b": ("Qwen2Config", "qwen2", dict(
        hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "llama2-7b": ("LlamaConfig", "llama2", dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # --quick: seconds on any machine
    "tiny": ("Qwen2Config", "llama3", dict(
        hidden_size=64, num_hidden_layers=6, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024,
        tie_word_embeddings=True)),
}
REAL_MODELS = {"demo": "Qwen2.5-Coder-0.5B-Instruct", "demo-1.5b": "Qwen2.5-Coder-1.5B-Instruct"}
"""The built-in models (real weights, their own tokenizers), by the name ``load_model`` takes."""
MODEL_CHOICES = (*REAL_MODELS, *FULL_SIZE)


@functools.cache
def bench_tokenizer(template: str = "llama3", vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained in memory on the benchmark prompts, with a chat template.

    Random-weight models have no tokenizer of their own and the GPU machine cannot download
    one. Trained on the benchmark prompts and on Llama Guard 3's task text, it gives lengths
    close to a real tokenizer's (AdvBench/Alpaca: about 14 tokens per instruction, Qwen2.5's
    12; the guard task: 215 tokens, Qwen2.5's 209), and its ids fit every model's vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pyvene_harm.guard.generative import llama_guard_3_task

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [*advbench_prompts(), *alpaca_prompts()[:3000], *_FALLBACK_HARMFUL, *_FALLBACK_HARMLESS,
              *[llama_guard_3_task("")] * 5]
    tok.train_from_iterator(corpus, trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_BOS[template],
                                  eos_token=_EOS[template], unk_token="<unk>", pad_token="<pad>")
    out.chat_template = _TEMPLATES[template]
    return out


@dataclass
class BenchModel:
    """A causal LM, its tokenizer and what to say about it in a result file."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.name,
            "architecture": type(self.model).__name__,
            "weights": f"real ({REAL_MODELS[self.name]})" if self.name in REAL_MODELS else "random",
            "parameters": n_params,
            "layers": self.n_layers,
            "hidden_size": int(cfg.hidden_size),
            "vocab_size": int(cfg.vocab_size),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "tokenizer": "model's own" if self.name in REAL_MODELS else "in-memory BPE (benchmarks/_bench_models.py)",
        }


def load_bench_model(name: str, *, device: str | torch.device, dtype: torch.dtype,
                     seed: int = 0) -> BenchModel:
    """A built-in model (``demo``, ``demo-1.5b``: real weights), a full-size random model, or ``tiny``.

    Random models are built directly on ``device`` in ``dtype`` (no float32 copy on the host
    first): an 8B model takes 16 GB in bf16 and a few seconds to initialise on a GPU.
    """
    device = torch.device(device)
    if name in REAL_MODELS:
        from pyvene_harm.models import load_model

        loaded = load_model(name, device=str(device), dtype=dtype)
        return BenchModel(loaded.model, loaded.tokenizer, name, device, dtype)
    if name not in FULL_SIZE:
        raise ValueError(f"unknown benchmark model {name!r}: choose one of {', '.join(MODEL_CHOICES)}")
    import transformers
    from transformers import AutoModelForCausalLM

    config_name, template, sizes = FULL_SIZE[name]
    tokenizer = bench_tokenizer(template)
    config = getattr(transformers, config_name)(
        **sizes, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if name == "tiny":
        # random init leaves the residual stream tiny; scale so that states differ visibly
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(20.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return BenchModel(model, tokenizer, name, device, dtype)
