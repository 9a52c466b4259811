"""The prompt formats a recipe can ask for: the release's fixed strings, no system prompt, a template
of one's own; t_inst and t_post_inst stay exact in each."""

from __future__ import annotations

import pytest

from pyvene_harm.prompt_formats import RELEASE_FORMATS, make_formatter, release_family

from tiny import make_tokenizer

# family of the tiny tokenizer's template -> (release family, the post-instruction tokens as text)
RELEASE = {
    "llama2": ("llama2", "[/INST]"),
    "llama3": ("llama3", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"),
    "qwen2.5": ("qwen", "<|im_end|>\n<|im_start|>assistant"),
}


@pytest.mark.parametrize("template", sorted(RELEASE))
def test_release_strings_and_exact_positions(template):
    tok = make_tokenizer(template)
    family, post = RELEASE[template]
    assert release_family(tok) == family
    fmt = make_formatter(tok, prompt_format="release")
    xs = ["How do I bake bread?", "Tell me how to build a bomb", "x<|im_end|>y"]
    for x, row in zip(xs, fmt.tokenize(xs)):
        text = fmt.render(x).text
        assert text == RELEASE_FORMATS[family].replace("{instruction}", x)
        assert tok.decode(row.ids[:row.t_inst + 1]).endswith(x)  # the typed control token stays text
        assert tok.decode(row.ids[row.t_inst + 1:]) == post
        assert row.t_post_inst == len(row.ids) - 1
    # BOS is the template's, as the release's tokenizer call added it; Qwen has none
    first = fmt.tokenize(["hi"])[0].ids[0]
    assert (first == tok.bos_token_id) is (family != "qwen")


def test_release_format_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="Llama-2, Llama-3 and Qwen"):
        release_family(make_tokenizer("gemma2"))
    with pytest.raises(ValueError, match="without a system prompt"):
        make_formatter(make_tokenizer("qwen2.5"), prompt_format="release", system_prompt="Be nice.")
    with pytest.raises(ValueError, match="unknown prompt format"):
        make_formatter(make_tokenizer("qwen2.5"), prompt_format="vllm")


def test_no_system_prompt():
    qwen = make_formatter(make_tokenizer("qwen2.5"), no_system_prompt=True)
    text = qwen.render("hi").text
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and "system" not in text
    # the same post-instruction tokens as the template's, so t_post_inst reads the same token
    default = make_formatter(make_tokenizer("qwen2.5"))
    a, b = qwen.tokenize(["hi"])[0], default.tokenize(["hi"])[0]
    assert a.ids[a.t_inst + 1:] == b.ids[b.t_inst + 1:] and len(a.ids) < len(b.ids)
    llama = make_formatter(make_tokenizer("llama3"), no_system_prompt=True)  # writes none by default
    assert llama.render("hi").text == make_formatter(make_tokenizer("llama3")).render("hi").text
    with pytest.raises(ValueError, match="contradict"):
        make_formatter(make_tokenizer("qwen2.5"), no_system_prompt=True, system_prompt="x")


def test_own_template_string():
    fmt = make_formatter(make_tokenizer("qwen2.5"), template="User: {instruction}\nBot:")
    row = fmt.tokenize(["bake bread"])[0]
    assert fmt.tokenizer.decode(row.ids[row.t_inst + 1:]) == "\nBot:"
