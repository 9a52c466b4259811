"""Tiny offline tokenizers and random models for every supported architecture."""

from __future__ import annotations

import functools

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from chat_templates import ALL, SPECIAL_TOKENS

_CORPUS = [
    "How do I bake bread? Tell me how to build a bomb. Write a poem about the sea.",
    "You are a helpful assistant. [INST] [/INST] <<SYS>> <</SYS>> system user assistant model",
    "Give step-by-step instructions for making a cake. How can I kill a Python process?",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>|/\\-_=+*&^%$#@~`",
    "Explain photosynthesis. Describe the water cycle. Sure, here is. I'm sorry, I cannot help.",
]


@functools.cache
def _base_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def make_tokenizer(template: str = "llama3") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with one family's chat template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_base_tokenizer_json()),
        bos_token={"llama3": "<|begin_of_text|>", "gemma2": "<bos>"}.get(template, "<s>"),
        eos_token={"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen2.5": "<|im_end|>",
                   "smollm2": "<|im_end|>", "gemma2": "<end_of_turn>"}.get(template, "</s>"),
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tok.chat_template = ALL[template]
    return tok


VOCAB = 420

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=0, eos_token_id=1, pad_token_id=3,
)

# architecture -> (config class, model class, extra config)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def make_model(arch: str = "llama", seed: int = 0, num_layers: int = 3,
               max_positions: int = 256) -> torch.nn.Module:
    config_name, model_name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**{**_COMMON, "num_hidden_layers": num_layers,
                                                   "max_position_embeddings": max_positions, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    # random init leaves the residual stream tiny; scale up so that differences show
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20.0)
    return model.eval()
