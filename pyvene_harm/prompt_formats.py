"""How a recipe writes its prompts: the tokenizer's chat template, a template of your own, the
template without a system prompt, or the paper's release strings.

The paper's release code does not render the tokenizer's chat template: it formats every prompt
with a fixed string per model family and no system prompt (``src/utils.py``), tokenised with the
tokenizer's special tokens added (BOS for Llama). :data:`RELEASE_FORMATS` writes those strings
out, BOS included, so that :class:`~pyvene_harm.positions.ChatFormatter` finds t_inst and
t_post_inst in them exactly as in any template (t_post_inst is then the last token of
``assistant``, or the header's ``\\n`` for Llama-3). The tokenizer's template adds a system prompt
for Qwen (``You are Qwen, created by Alibaba Cloud...``) and ``\\n`` after ``assistant``; both
change what the model reads at t_post_inst.
"""

from __future__ import annotations

from .positions import ChatFormatter

__all__ = ["PROMPT_FORMATS", "RELEASE_FORMATS", "make_formatter", "release_family"]

PROMPT_FORMATS = ("template", "release")
"""``template``: the tokenizer's chat template (or ``--template``); ``release``: the release's strings."""

RELEASE_FORMATS = {
    "llama2": "<s>[INST]{instruction}[/INST]",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n{instruction}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n",
    "qwen": "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant",
}
"""The release's prompt string per family (``src/utils.py``, ``formatInp_llama_persuasion``)."""

_CHATML_NO_SYSTEM = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def release_family(tokenizer) -> str:
    """``llama2``, ``llama3`` or ``qwen``, read from the tokenizer's chat template."""
    source = str(getattr(tokenizer, "chat_template", None) or "")
    for family, marker in (("qwen", "<|im_start|>"), ("llama3", "<|start_header_id|>"), ("llama2", "[INST]")):
        if marker in source:
            return family
    raise ValueError("the release wrote prompt strings for the Llama-2, Llama-3 and Qwen families only, and this "
                     "tokenizer's chat template is none of them: pass --template instead")


def make_formatter(tokenizer, *, system_prompt: str | None = None, template: str | None = None,
                   prompt_format: str | None = None, no_system_prompt: bool = False) -> ChatFormatter:
    """The :class:`ChatFormatter` a recipe's prompt options ask for.

    Args:
        system_prompt: a system message for every prompt.
        template: a Jinja chat template or a format string with ``{instruction}``.
        prompt_format: ``None``/``"template"`` or ``"release"`` (:data:`RELEASE_FORMATS`).
        no_system_prompt: render no system turn at all, where the template would add a default.
    """
    if prompt_format not in (None, *PROMPT_FORMATS):
        raise ValueError(f"unknown prompt format {prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")
    if prompt_format == "release":
        if template is not None or system_prompt is not None:
            raise ValueError("the release format is a fixed string without a system prompt: drop --template and "
                             "--system-prompt, or drop --prompt-format release")
        return ChatFormatter(tokenizer, template=RELEASE_FORMATS[release_family(tokenizer)])
    if no_system_prompt:
        if system_prompt is not None:
            raise ValueError("--no-system-prompt and --system-prompt contradict each other: keep one")
        if template is None:
            template = _template_without_system_prompt(tokenizer)
    return ChatFormatter(tokenizer, system_prompt=system_prompt, template=template)


def _template_without_system_prompt(tokenizer) -> str | None:
    """None when the tokenizer's template writes no system turn for a lone user message; the
    ChatML string without one when it writes a default (Qwen); an error otherwise."""
    text = ChatFormatter(tokenizer).render("x").text
    if "<|im_start|>system" in text:
        return _CHATML_NO_SYSTEM
    if "system" in text.lower():
        raise ValueError("this chat template writes a system turn of its own for every prompt (e.g. Llama-3.1's "
                         "date header): pass --template with one that does not, or --prompt-format release")
    return None
