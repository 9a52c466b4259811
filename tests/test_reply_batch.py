"""Replies decoded together (``generate_reply_batch``) against the same replies decoded alone, and
the worker's grouping of waiting replies into one batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pyvene_harm.conversation import Conversation
from pyvene_harm.guard import LatentGuard
from pyvene_harm.interventions import ablate
from pyvene_harm.positions import ChatFormatter
from pyvene_harm.serve import GuardWorker, generate_reply
from pyvene_harm.serve.decoding import ReplyRequest, generate_reply_batch
from pyvene_harm.serve.jobs import ChatJob

from test_interventions_hooks import random_directions
from tiny import make_model, make_tokenizer

PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the lazy dog, please", "Tell me",
           "Describe the water cycle."]


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    model, tok = make_model("qwen2", max_positions=1024), make_tokenizer("qwen2.5")
    return model, ChatFormatter(tok)


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "ablated"])
def test_a_batch_equals_each_reply_alone(parts, steered):
    model, fmt = parts
    steering = ablate(model, random_directions(n_states=4)) if steered else None
    lengths = [12, 5, 9, 1]
    alone = [generate_reply(model, fmt, p, max_new_tokens=n, steering=steering) for p, n in zip(PROMPTS, lengths)]
    pieces: list[list[str]] = [[] for _ in PROMPTS]
    batch = generate_reply_batch(model, fmt, [ReplyRequest(p, n, on_text=pieces[i].append)
                                              for i, (p, n) in enumerate(zip(PROMPTS, lengths))], steering=steering)
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [r.completion_tokens for r in batch] == [r.completion_tokens for r in alone]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in alone]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in alone]
    assert ["".join(p) for p in pieces] == [r.text for r in batch]  # streamed pieces add up


def test_rows_stop_on_their_own(parts):
    model, fmt = parts
    full = generate_reply(model, fmt, PROMPTS[0], max_new_tokens=12)
    assert len(full.text) > 4
    stop = full.text[3:5]
    calls = {"n": 0}

    def leave_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    out = generate_reply_batch(model, fmt, [
        ReplyRequest(PROMPTS[0], 12, stop=(stop,)),
        ReplyRequest(PROMPTS[1], 12, should_stop=leave_after_three),
        ReplyRequest(PROMPTS[2], 12)])
    assert out[0].finish_reason == "stop" and out[0].text == full.text[:full.text.find(stop)]
    assert out[1].finish_reason == "cancelled" and out[1].completion_tokens == 4
    assert out[2].completion_tokens == generate_reply(model, fmt, PROMPTS[2], max_new_tokens=12).completion_tokens


def test_worker_decodes_waiting_greedy_replies_in_one_batch(parts):
    model, fmt = parts
    tok = fmt.tokenizer
    guard = LatentGuard(model, tok, batch_size=4).fit(PROMPTS, [1, 0, 1, 0])
    guard.threshold_ = 1e6  # let everything through: what is tested is the decoding
    worker = GuardWorker(guard, model, tok, max_batch=8, max_wait_ms=200, max_reply_batch=8)
    worker.start()

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [ChatJob(loop, conversation=Conversation((("user", p),)), max_new_tokens=6) for p in PROMPTS[:3]]
        jobs.append(ChatJob(loop, conversation=Conversation((("user", PROMPTS[3]),)), max_new_tokens=6,
                            temperature=0.7, seed=1))  # sampled: decoded on its own
        for job in jobs:
            worker.submit(job)
        out = []
        for job in jobs:
            while True:
                kind, value = await job.events.get()
                if kind == "done":
                    out.append(value)
                    break
        return out

    try:
        replies = asyncio.run(run())
    finally:
        worker.stop()
    gf = guard.chat_formatter()
    for p, r in zip(PROMPTS[:3], replies):
        assert r.text == generate_reply(model, gf, Conversation((("user", p),)), max_new_tokens=6).text
    stats = worker.snapshot()
    assert stats["reply_batches"] == 1 and stats["largest_reply_batch"] == 3 and stats["replies"] == 4
