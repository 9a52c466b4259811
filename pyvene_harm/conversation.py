"""A conversation as the model reads it: system, user and assistant turns, the last one the user's.

A guard that reads one user instruction can be walked around by moving the request somewhere
else the model reads: into the system message, into an earlier (possibly fake) assistant turn,
or into an earlier user turn. :class:`Conversation` is what a guard judges instead: every
message on its own, and the last user message in the context of the whole conversation (see
:meth:`~pyvene_harm.guard.LatentGuard.judge_conversations`). :class:`~pyvene_harm.positions.ChatFormatter`
renders one with the tokenizer's chat template and finds t_inst (the last token of the last
user message) and t_post_inst (the last prompt token) exactly as for a single instruction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ROLES", "Conversation", "as_conversation"]

ROLES = ("system", "user", "assistant")
"""Roles a conversation may hold; OpenAI's ``developer`` is read as ``system``."""
_ALIASES = {"developer": "system"}


@dataclass(frozen=True)
class Conversation:
    """``messages``: ``(role, content)`` pairs, the last one a user message.

    Build one with :meth:`from_messages` from OpenAI-style ``{"role", "content"}`` dicts, which
    checks roles and contents and names the message at fault.
    """

    messages: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("empty conversation: send at least one user message")
        for i, m in enumerate(self.messages):
            if not (isinstance(m, tuple) and len(m) == 2 and all(isinstance(x, str) for x in m)):
                raise TypeError(f"messages[{i}] must be a (role, content) pair of strings, got {m!r}")
            if m[0] not in ROLES:
                raise ValueError(f"messages[{i}] has role {m[0]!r}: use one of {', '.join(ROLES)}")
            if not m[1].strip():
                raise ValueError(f"messages[{i}] ({m[0]}) is empty: every message needs some non-whitespace text")
        if self.messages[-1][0] != "user":
            raise ValueError(f"the last message must come from the user, not {self.messages[-1][0]!r}")

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping[str, Any]]) -> Conversation:
        """From ``[{"role": ..., "content": ...}, ...]`` (``developer`` is read as ``system``)."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError("a conversation is a list of {'role', 'content'} messages, "
                            f"not {type(messages).__name__}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
            role, content = m["role"], m["content"]
            if not isinstance(role, str) or not isinstance(content, str):
                raise TypeError(f"messages[{i}]: role and content must be strings")
            out.append((_ALIASES.get(role, role), content))
        return cls(tuple(out))

    @property
    def system_prompt(self) -> str | None:
        """The leading system message, if any (what decides how replies are steered)."""
        return self.messages[0][1] if self.messages[0][0] == "system" else None

    @property
    def last_user(self) -> str:
        return self.messages[-1][1]

    @property
    def single_turn(self) -> bool:
        """One user message and nothing else: the conversation is a plain instruction."""
        return len(self.messages) == 1

    def dicts(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        """The messages as chat-template dicts; ``system_prompt`` is put first when the
        conversation has no system message of its own (the formatter's default)."""
        out = [{"role": r, "content": c} for r, c in self.messages]
        if system_prompt is not None and self.system_prompt is None:
            out.insert(0, {"role": "system", "content": system_prompt})
        return out


def as_conversation(x: Any) -> Conversation:
    """A :class:`Conversation` from itself or from a list of message dicts."""
    return x if isinstance(x, Conversation) else Conversation.from_messages(x)
