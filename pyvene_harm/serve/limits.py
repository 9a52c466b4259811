"""What one request may ask for, and how requests are batched: the server's knobs in one value."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how requests are batched.

    Args:
        max_batch: most reads (inputs, messages, pieces) scored together (one ``guard.report`` call).
        max_batch_tokens: most tokens those reads hold together: bounds how long a batch, and
            so the wait of any request behind it, takes whatever one request holds.
        max_wait_ms: longest wait for more requests once the first of a batch has arrived.
        max_gap_ms: stop waiting sooner when no request has come for this long (None: no gap rule).
        max_queue: most requests waiting or running; more get 429.
        max_inputs: most strings in one moderation request.
        max_prompt_tokens: most tokens in one input or conversation (all its messages), counted
            with the pieces it is also read in when it types control tokens.
        max_new_tokens: most tokens a chat reply may ask for (also the default).
        max_body_bytes: largest request body.
        request_timeout_s: longest a request may take, queueing and decoding included (504 after).
        read_timeout_s: longest a client may take to send a request body (408 after; headers are
            bounded by the same time at the protocol level, see :mod:`~pyvene_harm.serve.protocol`).
        scoring_batches_per_reply: most scoring batches run while a chat reply waits.
        max_reply_batch: most greedy chat replies decoded together in one ``generate`` call
            (the replies waiting when one starts; 1 decodes one at a time).
        max_reply_reads: with an upstream engine and a reply guard, most chats queued or being
            relayed at once (more get 429): each reply read holds its KV cache until it ends, so
            this bounds the memory the reads take, apart from ``max_queue``.
    """

    max_batch: int = 32
    max_batch_tokens: int = 16384
    max_wait_ms: float = 10.0
    max_gap_ms: float | None = None
    max_queue: int = 1024
    max_inputs: int = 64
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 512
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0
    read_timeout_s: float = 10.0
    scoring_batches_per_reply: int = 2
    max_reply_batch: int = 32
    max_reply_reads: int = 64

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0, got {getattr(self, name)}")
        for name in ("max_batch", "max_batch_tokens", "max_queue", "max_inputs", "max_prompt_tokens", "max_new_tokens",
                     "max_body_bytes", "scoring_batches_per_reply", "max_reply_batch", "max_reply_reads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")
        if self.max_gap_ms is not None and self.max_gap_ms < 0:
            raise ValueError(f"max_gap_ms must be 0 or more, got {self.max_gap_ms}")
