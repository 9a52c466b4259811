"""Where a chat model reads an instruction: t_inst, t_post_inst and the post-instruction span.

The positions are found from the tokenizer's own chat template and the tokenizer's character
offsets, never from a per-model table and never by tokenising a suffix on its own (which breaks
when a token straddles the boundary between instruction and template). The template is rendered
once with a sentinel in place of the instruction to learn its prefix and suffix; the real
rendering must then start with that prefix and end with that suffix, and whatever lies between
is the instruction as the template wrote it (after any trimming the template does).

Preparing a batch (``encode``, ``tokenize``) renders all prompts in one batched template call,
checks each rendering against the cached prefix and suffix (a prompt the template rewrites, e.g.
trims, goes through the per-prompt path instead), and tokenises them in one tokenizer call.

A prompt may also be a :class:`~pyvene_harm.conversation.Conversation` (system, user and assistant
turns): t_inst is then the last token of the last user message. Whatever the client wrote (the
instruction, every message, a system prompt) is tokenised as plain text, so a control-token
string typed inside it never becomes a control token (:mod:`~pyvene_harm.literal_text`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from .conversation import Conversation
from .literal_text import control_token_ids, literal_client_text
from .prompt_batch import EncodedPrompt, PromptBatch, RenderedPrompt

__all__ = ["ChatFormatter", "EncodedPrompt", "PromptBatch", "RenderedPrompt", "template_hash"]

_SENTINEL = "\ue000PVH{n}\ue001"
_PLACEHOLDER = "{instruction}"


def template_hash(template: str | None) -> str:
    """A short stable fingerprint of a chat template (stored with every artifact)."""
    return hashlib.sha256((template or "").encode("utf-8")).hexdigest()[:16]


class ChatFormatter:
    """Renders instructions with a tokenizer's chat template and finds their positions.

    Args:
        tokenizer: a fast Hugging Face tokenizer (character offsets are required).
        system_prompt: ``None`` keeps the template's default; a string adds a system message.
        template: for tokenizers without a chat template: either a Jinja chat template or a
            plain string containing ``{instruction}`` such as ``"User: {instruction}\\nBot:"``.
        max_length: longest prompt allowed; defaults to the tokenizer's ``model_max_length``.

    Example:
        >>> fmt = ChatFormatter(tokenizer)
        >>> batch = fmt.encode(["How do I bake bread?"], padding_side="left")
        >>> batch.t_inst, batch.t_post_inst
    """

    def __init__(
        self,
        tokenizer,
        *,
        system_prompt: str | None = None,
        template: str | None = None,
        max_length: int | None = None,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is a slow tokenizer without character offsets: "
                "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self._format_string: str | None = None
        self._jinja: str | None = None
        if template is not None:
            if _PLACEHOLDER in template and "{%" not in template and "{{" not in template:
                self._format_string = template
            else:
                self._jinja = template
        elif getattr(tokenizer, "chat_template", None):
            self._jinja = None  # the tokenizer's own
        else:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: "
                "pass template='User: {instruction}\\nAssistant:' (or a Jinja chat template)"
            )
        limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
        self.max_length = int(limit) if limit and limit < 10**9 else None
        self._affixes: tuple[tuple[str | None, str], tuple[str, str]] | None = None
        self._system_span: tuple[tuple[str | None, str], tuple[tuple[int, int], ...]] | None = None
        self._specials: np.ndarray | None = None

    # --- rendering ---------------------------------------------------------------------

    @property
    def template_override(self) -> str | None:
        """The template given in place of the tokenizer's own (None: the tokenizer's)."""
        return self._format_string if self._format_string is not None else self._jinja

    @property
    def template_source(self) -> str:
        """The template text in use (hashed into artifacts' provenance)."""
        if self._format_string is not None:
            return self._format_string
        if self._jinja is not None:
            return self._jinja
        tpl = self.tokenizer.chat_template
        return tpl if isinstance(tpl, str) else str(tpl)

    def _messages(self, user_message: str) -> list[dict[str, str]]:
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": user_message})
        return messages

    def _render_messages(self, messages: list[dict[str, str]]) -> str:
        """A whole conversation through the Jinja template (with the generation prompt)."""
        if self._format_string is not None:
            raise ValueError("a plain format-string template renders one instruction, not a conversation: "
                             "pass a Jinja chat template as template=")
        from jinja2 import TemplateError

        kwargs = {"chat_template": self._jinja} if self._jinja is not None else {}
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **kwargs)
        except TemplateError as err:
            roles = ", ".join(m["role"] for m in messages)
            raise ValueError(f"the chat template refuses this conversation (roles: {roles}): {err}") from None

    def render_conversation(self, conversation: Conversation) -> RenderedPrompt:
        """Render a conversation and locate every message in it; the instruction is the last
        user message, so t_inst is its last token.

        The template is rendered once with a sentinel in place of each message to learn the
        text between messages; the real rendering must be that text with each message written
        in turn (as given, or trimmed, as some templates do). A template that drops, merges or
        rewrites a message is an error, never a guess: a guard must know where every message is.
        """
        messages = conversation.dicts(self.system_prompt)
        contents = [m["content"] for m in messages]
        n = 0
        while any(_SENTINEL.format(n=n + k) in c for c in contents for k in range(len(contents))):
            n += len(contents)
        marks = [_SENTINEL.format(n=n + k) for k in range(len(contents))]
        skeleton = self._render_messages([{**m, "content": x} for m, x in zip(messages, marks)])
        pieces, at = [], 0
        for k, mark in enumerate(marks):
            found = skeleton.find(mark, at)
            if found < 0 or skeleton.count(mark) != 1:
                raise ValueError(f"the chat template does not write message {k} ({messages[k]['role']}) exactly "
                                 "once, so the guard cannot read it: pass a template= that writes every message")
            pieces.append(skeleton[at:found])
            at = found + len(mark)
        pieces.append(skeleton[at:])
        text = self._render_messages(messages)
        spans, pos = [], 0
        for k, content in enumerate(contents):
            if not text.startswith(pieces[k], pos):
                raise ValueError("the chat template rewrites this conversation, so its messages cannot be located: "
                                 "pass a custom template= to ChatFormatter")
            pos += len(pieces[k])
            tail = pieces[k + 1]
            for written in (content, content.strip(), content.lstrip(), content.rstrip()):
                end = pos + len(written)
                if text.startswith(written, pos) and text.startswith(tail, end) and (
                        k + 1 < len(contents) or end + len(tail) == len(text)):
                    break
            else:
                raise ValueError(f"the chat template rewrites message {k} ({messages[k]['role']}), so it cannot "
                                 "be located: pass a custom template= to ChatFormatter")
            spans.append((pos, end))
            pos = end
        start, end = spans[-1]
        return RenderedPrompt(text=text, inst_start=start, inst_end=end, inner_end=end, client=tuple(spans))

    def _system_spans(self) -> tuple[tuple[int, int], ...]:
        """Where this formatter's own system prompt sits in every prompt it renders: text a
        caller chose (in a server, a client), so read as plain text too."""
        key = (self.system_prompt, self.template_source)
        if self._system_span is None or self._system_span[0] != key:
            if self.system_prompt is None:
                spans: tuple[tuple[int, int], ...] = ()
            elif self._format_string is not None:
                spans = ((0, len(self.system_prompt)),)
            else:
                spans = self.render_conversation(Conversation((("user", "x"),))).client[:-1]
            self._system_span = (key, spans)
        return self._system_span[1]

    def _render_raw(self, user_message: str) -> str:
        return self._render_raw_many([user_message])[0]

    def _render_raw_many(self, user_messages: Sequence[str]) -> list[str]:
        """The template applied to each message, in one batched call for Jinja templates."""
        if self._format_string is not None:
            texts = [self._format_string.replace(_PLACEHOLDER, m) for m in user_messages]
            if self.system_prompt:
                texts = [self.system_prompt + "\n" + t for t in texts]
            return texts
        from jinja2 import TemplateError

        kwargs = {"chat_template": self._jinja} if self._jinja is not None else {}
        try:
            return list(self.tokenizer.apply_chat_template(
                [self._messages(m) for m in user_messages], tokenize=False, add_generation_prompt=True, **kwargs
            ))
        except TemplateError as err:
            raise ValueError(f"the chat template refuses this prompt: {err}"
                             + (" (drop the system prompt)" if self.system_prompt is not None else "")) from None

    def _template_affixes(self, user_message: str) -> tuple[str, str]:
        n = 0
        while _SENTINEL.format(n=n) in user_message:
            n += 1
        # the same sentinel renders the same affixes, as long as the template and system prompt stay
        key = (self.system_prompt, self.template_source)
        if n == 0 and self._affixes is not None and self._affixes[0] == key:
            return self._affixes[1]
        sentinel = _SENTINEL.format(n=n)
        rendered = self._render_raw(sentinel)
        at = rendered.find(sentinel)
        if at < 0 or rendered.find(sentinel, at + 1) >= 0:
            raise ValueError(
                "the chat template does not write the user message exactly once; "
                "pass a custom template= to ChatFormatter"
            )
        affixes = rendered[:at], rendered[at + len(sentinel) :]
        if n == 0:
            self._affixes = (key, affixes)
        return affixes

    @staticmethod
    def _user_message(instruction: str, wrapper: str | None) -> str:
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
        if not instruction.strip():
            raise ValueError("empty instruction: every prompt needs some non-whitespace text")
        user = instruction if wrapper is None else wrapper.replace(_PLACEHOLDER, instruction)
        if wrapper is not None and _PLACEHOLDER not in wrapper:
            raise ValueError(f"wrapper {wrapper!r} has no {_PLACEHOLDER} placeholder")
        return user

    def render(self, instruction: str, *, wrapper: str | None = None) -> RenderedPrompt:
        """Render one instruction and locate it by character offsets.

        Args:
            instruction: the user's request.
            wrapper: optional user-message format with ``{instruction}``, e.g. the reply
                inversion question ``"User wants to {instruction}\\nCould ...?"``; the inner
                instruction's end is reported as ``inner_end``.
        """
        user = self._user_message(instruction, wrapper)
        prefix, suffix = self._template_affixes(user)
        text = self._render_raw(user)
        return self._locate(instruction, wrapper, text, prefix, suffix, self._system_spans())

    def render_many(self, instructions: Sequence[str], *, wrapper: str | None = None) -> list[RenderedPrompt]:
        """:meth:`render` for many instructions, with one batched template call.

        A rendering that is exactly the cached template prefix + message + suffix is located
        from the affixes' lengths; any other (a template that trims or rewrites this message, a
        message holding the sentinel) goes through :meth:`render`, so the result is the same.
        """
        users = [self._user_message(x, wrapper) for x in instructions]
        prefix, suffix = self._template_affixes("")
        system = self._system_spans()
        sentinel = _SENTINEL.format(n=0)
        out = []
        for x, user, text in zip(instructions, users, self._render_raw_many(users)):
            if sentinel in user or text != prefix + user + suffix:
                out.append(self.render(x, wrapper=wrapper))
            else:
                out.append(self._locate(x, wrapper, text, prefix, suffix, system))
        return out

    def render_items(self, items: Sequence[str | Conversation], *, wrapper: str | None = None) -> list[RenderedPrompt]:
        """:meth:`render_many` for instructions and :meth:`render_conversation` for
        conversations, in the order given."""
        out: list[RenderedPrompt | None] = [None] * len(items)
        plain = [i for i, x in enumerate(items) if not isinstance(x, Conversation)]
        if len(plain) < len(items) and wrapper is not None:
            raise ValueError("a wrapper applies to single instructions, not to conversations")
        for i, r in zip(plain, self.render_many([items[i] for i in plain], wrapper=wrapper) if plain else []):
            out[i] = r
        for i, x in enumerate(items):
            if isinstance(x, Conversation):
                out[i] = self.render_conversation(x)
        return out  # type: ignore[return-value]

    @staticmethod
    def _locate(instruction: str, wrapper: str | None, text: str, prefix: str, suffix: str,
                system: tuple[tuple[int, int], ...] = ()) -> RenderedPrompt:
        if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix) + len(suffix):
            raise ValueError(
                "the chat template rewrites the prompt around this instruction, so it cannot be "
                f"located: {instruction[:60]!r}; pass a custom template= to ChatFormatter"
            )
        start, end = len(prefix), len(text) - len(suffix)
        written = text[start:end]
        if not written.strip():
            raise ValueError("the chat template wrote an empty user message")
        inner_end = end
        if wrapper is not None:
            # the template may have trimmed the message's ends, never its middle
            head = wrapper.split(_PLACEHOLDER, 1)[0].lstrip()
            inner = instruction.strip()
            at = written.find(inner, len(head) if instruction[:1].strip() else 0)
            if at < 0:
                raise ValueError("could not locate the instruction inside the wrapper")
            inner_end = start + at + len(inner)
        return RenderedPrompt(text=text, inst_start=start, inst_end=end, inner_end=inner_end,
                              client=(*system, (start, end)))

    # --- encoding ----------------------------------------------------------------------

    def tokenize(
        self,
        instructions: Sequence[str],
        *,
        post_instruction: bool = True,
        wrapper: str | None = None,
    ) -> list[EncodedPrompt]:
        """Render and tokenise each instruction once (one batched call), unpadded.

        The arguments are those of :meth:`encode`; :meth:`collate` pads any subset into a
        :class:`PromptBatch`, so a caller can sort by length first without tokenising twice.
        """
        if isinstance(instructions, str):
            raise TypeError("pass a list of instructions, not a single string")
        if len(instructions) == 0:
            raise ValueError("empty instruction list: pass at least one instruction")
        rendered = self.render_items(instructions, wrapper=wrapper)
        texts = [r.text if post_instruction else r.text[: r.inst_end] for r in rendered]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False)
        if self._specials is None:
            self._specials = control_token_ids(self.tokenizer)
        rows = []
        for r, text, ids, offsets in zip(rendered, texts, enc["input_ids"], enc["offset_mapping"]):
            ids, offsets = literal_client_text(self.tokenizer, text, ids, offsets, r.client, self._specials)
            rows.append(self._positions(r, ids, offsets))
        longest = max(len(r.ids) for r in rows)
        if self.max_length is not None and longest > self.max_length:
            worst = max(range(len(rows)), key=lambda i: len(rows[i].ids))
            raise ValueError(
                f"instruction {worst} is {longest} tokens long once templated, over the model's "
                f"context of {self.max_length} tokens: shorten it or drop it"
            )
        return rows

    @staticmethod
    def _positions(rendered: RenderedPrompt, ids: list[int], offsets: Sequence[tuple[int, int]]) -> EncodedPrompt:
        t_inst = _token_covering(offsets, rendered.inst_end - 1)
        inst_start = _token_covering(offsets, rendered.inst_start)
        inner_end = _token_covering(offsets, rendered.inner_end - 1)
        if t_inst is None or inst_start is None or inner_end is None:
            raise ValueError(
                "the tokenizer's offsets do not cover the instruction; "
                "is this a fast tokenizer with offset mapping?"
            )
        return EncodedPrompt(ids=ids, inst_start=inst_start, t_inst=t_inst, inner_end=inner_end)

    def collate(self, rows: Sequence[EncodedPrompt], *, padding_side: str = "left") -> PromptBatch:
        """Pad prompts from :meth:`tokenize` into one :class:`PromptBatch`."""
        if len(rows) == 0:
            raise ValueError("empty instruction list: pass at least one instruction")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        lengths = np.array([len(r.ids) for r in rows], dtype=np.int64)
        longest = int(lengths.max())
        shift = longest - lengths if padding_side == "left" else np.zeros_like(lengths)
        input_ids = np.full((len(rows), longest), _pad_id(self.tokenizer), dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, (r, s) in enumerate(zip(rows, shift.tolist())):
            input_ids[i, s : s + len(r.ids)] = r.ids
            mask[i, s : s + len(r.ids)] = 1

        def at(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array([getattr(r, name) for r in rows], dtype=np.int64) + shift)

        mask_t = torch.from_numpy(mask)
        return PromptBatch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=mask_t,
            position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0),
            t_inst=at("t_inst"),
            t_post_inst=torch.from_numpy(lengths - 1 + shift),
            inst_start=at("inst_start"),
            prompt_start=torch.from_numpy(shift.copy()),
            inner_end=at("inner_end"),
            padding_side=padding_side,
        )

    def encode(
        self,
        instructions: Sequence[str],
        *,
        padding_side: str = "left",
        post_instruction: bool = True,
        wrapper: str | None = None,
    ) -> PromptBatch:
        """Tokenise a batch of instructions and find each example's positions.

        Args:
            instructions: the user requests.
            padding_side: ``"left"`` (for generation) or ``"right"``.
            post_instruction: ``False`` drops the post-instruction tokens (the paper's
                Table 1 ablation): the prompt then ends at t_inst.
            wrapper: see :meth:`render`.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        rows = self.tokenize(instructions, post_instruction=post_instruction, wrapper=wrapper)
        return self.collate(rows, padding_side=padding_side)


def _token_covering(offsets: Sequence[tuple[int, int]], char: int) -> int | None:
    """Index of the last token whose character span contains ``char``.

    Byte-level tokenizers can give several tokens the same span (one character split into
    bytes); the last of them is the one that completes the character.
    """
    found = None
    for i, (s, e) in enumerate(offsets):
        if s <= char < e:
            found = i
        elif found is not None and s > char:
            break
    if found is None:
        # some tokenizers fold a leading space into the next token's span; fall back to the
        # last token starting at or before the character
        for i, (s, e) in enumerate(offsets):
            if e > s and s <= char:
                found = i
    return found


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0
