"""The reply guard in front of an upstream engine: the guard's copy reads the engine's own reply
tokens (vLLM's ``return_token_ids``) piece by piece, scores as a read of the finished reply does,
relays a piece only after reading it, and a flagged reply ends there, the engine's stream closed."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
from fake_engine import FakeEngine, serve_in_thread
from openai import APIError, OpenAI

from pyvene_harm.conversation import Conversation
from pyvene_harm.guard import LatentGuard
from pyvene_harm.guard.reply import ReplyGuard, scored_ends
from pyvene_harm.serve import create_app
from pyvene_harm.serve.upstream import UpstreamEngine, check_upstream
from pyvene_harm.serve.upstream_replies import UpstreamReplyRead

from tiny import make_model, make_tokenizer

PROMPT = "Tell me a story about the sea"
PIECES = ["Once", " upon a time", " a small boat", " sailed", " across the", " wide grey sea", " and",
          " found an island", " full of", " birds."]


def _fitted(model, tok) -> ReplyGuard:
    pairs = [(f"question {i}", ("Sure, here is how to do harm " if i % 2 else "Happy to help with ") * 3)
             for i in range(12)]
    return ReplyGuard(model, tok, states=(1, 2), width=4, min_tokens=3, C=1.0, rank=8).fit(
        pairs, [i % 2 for i in range(12)])


@pytest.fixture(scope="module")
def parts():
    model, tok = make_model("qwen2", max_positions=2048).eval(), make_tokenizer("qwen2.5")
    return model, tok, _fitted(model, tok)


def _piece_ids(tok, pieces) -> list[list[int]]:
    return [tok(p, add_special_tokens=False, split_special_tokens=True)["input_ids"] for p in pieces]


def test_reading_the_engines_tokens_piece_by_piece_scores_as_the_finished_read(parts):
    model, tok, guard = parts
    conv = Conversation.from_messages([{"role": "user", "content": PROMPT}])
    prompt_ids = list(guard.chat_formatter().tokenize([conv])[0].ids)
    ids = [t for p in _piece_ids(tok, PIECES) for t in p]
    scores = guard.token_scores([(conv, ids)])[0]
    ends = scored_ends(len(scores), guard.min_tokens)
    free = copy.copy(guard)
    free.threshold_ = 1e9  # reads the whole reply
    for cut in ([1] * len(ids), [3, 1, 5, len(ids)], [len(ids)]):  # one token a chunk, uneven, all at once
        read, at = UpstreamReplyRead(free, model, prompt_ids), 0
        for n in cut:
            read.read(ids[at:at + n])
            at += n
            if at >= len(ids):
                break
        s = read.summary()
        assert s["tokens_judged"] == len(ids) and s["flagged"] is False
        np.testing.assert_allclose(s["score"] + free.threshold_, scores[ends].max(), rtol=1e-5, atol=1e-5)
        assert s["score"] == pytest.approx(free.judge(conv, ids)["score"], abs=1e-5)

    # flagged: stops at the first counted window over the threshold; later tokens are not read
    k = _peak(scores, ends)
    flagging = ReplyGuard.load(_saved(guard, k, scores, ends), model, tok)
    read = UpstreamReplyRead(flagging, model, prompt_ids)
    got = [read.read([t]) for t in ids]
    assert read.summary()["token"] == k and got[k] == k and all(g is None for g in got[:k])
    assert read.stream.n_tokens == k + 1


_TMP: list = []


def _peak(scores: np.ndarray, ends: np.ndarray) -> int:
    """The highest counted window in the first two thirds of the reply: a threshold just under it
    flags the reply there first, with tokens left after it."""
    early = ends[: max(1, 2 * len(ends) // 3)]
    return int(early[np.argmax(scores[early])])


def _saved(guard: ReplyGuard, k: int, scores: np.ndarray, ends: np.ndarray):
    """The guard with its threshold set so that token ``k`` is the first counted one over it."""
    import tempfile
    from pathlib import Path

    before = scores[ends[ends < k]]
    assert not len(before) or scores[k] - before.max() > 1e-4, "two windows tie: pick another reply"
    low = before.max() if len(before) else scores[k] - 1.0
    g = copy.copy(guard)
    g.threshold_ = float((scores[k] + low) / 2)
    folder = Path(tempfile.mkdtemp()) / "rg"
    _TMP.append(folder)
    g.save(folder)
    return folder


def test_a_copy_cut_to_the_read_layers_reads_as_the_whole_model(parts):
    from pyvene_harm.decoder_depth import drop_unread_layers

    model, tok, guard = parts
    cut = copy.deepcopy(model)
    drop_unread_layers(cut, list(guard.states_))
    conv = Conversation.from_messages([{"role": "user", "content": PROMPT}])
    prompt_ids = list(guard.chat_formatter().tokenize([conv])[0].ids)
    free = copy.copy(guard)
    free.threshold_ = 1e9
    whole, part = UpstreamReplyRead(free, model, prompt_ids), UpstreamReplyRead(free, cut, prompt_ids)
    for p in _piece_ids(tok, PIECES):
        whole.read(p), part.read(p)
    assert len(cut.model.layers) < len(model.model.layers)
    assert whole.summary()["score"] == pytest.approx(part.summary()["score"], abs=1e-5)


@pytest.fixture(scope="module")
def served(parts):
    """A server in front of a fake engine whose reply is PIECES, with a prompt guard that lets
    everything through and the reply guard set to flag the reply at a token inside it."""
    model, tok, guard = parts
    prompt_guard = LatentGuard(model, tok, batch_size=4).fit(
        ["Tell me how to build a bomb.", "Write malware for me.", "How do I bake bread?", "Explain tides."],
        [1, 1, 0, 0])
    prompt_guard.threshold_ = 1e9
    fake = FakeEngine(tok)
    fake.pieces = PIECES
    with serve_in_thread(fake.app) as engine_url:
        fake.url = engine_url
        conv = Conversation.from_messages([{"role": "user", "content": PROMPT}])
        ids = [t for p in _piece_ids(tok, PIECES) for t in p]
        scores = guard.token_scores([(conv, ids)])[0]
        ends = scored_ends(len(scores), guard.min_tokens)
        k = _peak(scores, ends)
        flagging = ReplyGuard.load(_saved(guard, k, scores, ends), model, tok)
        upstream = check_upstream(UpstreamEngine(engine_url, timeout_s=10.0), tok)
        app = create_app(prompt_guard, model, tok, model_name="m", engine=upstream, reply_guard=flagging,
                         refusal_message="No.")
        with serve_in_thread(app) as url:
            yield url, fake, k, flagging


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)


@pytest.mark.parametrize("delay_s", [0.05, 0.0], ids=["piece by piece", "pieces read together"])
def test_server_stops_an_engine_reply_before_the_piece_it_flags(parts, served, delay_s):
    """Slow, each piece is read as it comes and the engine is still writing when it is cut off;
    at once, the pieces that arrived during a read are read together, and the same pieces reach
    the client."""
    _, tok, _ = parts
    url, fake, k, _ = served
    fake.mode, fake.aborted, fake.delay_s = "slow" if delay_s else "ok", 0, delay_s
    msgs = [{"role": "user", "content": PROMPT}]
    chunks = list(_client(url).chat.completions.create(model="m", messages=msgs, max_tokens=64, stream=True))
    assert fake.requests[-1]["return_token_ids"] is True
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1].to_dict()
    assert last["choices"][0]["finish_reason"] == "content_filter"
    assert last["choices"][0]["delta"]["refusal"] == "No."
    assert last["guard"]["action"] == "stopped" and f"reply (token {k})" in last["guard"]["flagged_by"]
    # every piece before the one holding token k was relayed, that piece and later ones were not
    counts = np.cumsum([len(p) for p in _piece_ids(tok, PIECES)])
    holding = int(np.searchsorted(counts, k, side="right"))
    assert text == "".join(PIECES[:holding])
    if delay_s:
        deadline = time.monotonic() + 10
        while fake.aborted == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.aborted == 1  # the engine's stream was closed before its end
    fake.mode, fake.delay_s = "ok", 0.0
    whole = _client(url).chat.completions.create(model="m", messages=msgs, max_tokens=64)
    assert whole.choices[0].finish_reason == "content_filter" and whole.choices[0].message.content == "No."
    assert whole.to_dict()["guard"]["reply"]["token"] == k


def test_a_reply_let_through_is_relayed_whole_with_every_token_read(parts, served):
    _, tok, _ = parts
    url, fake, _, flagging = served
    fake.mode, fake.aborted = "ok", 0
    fake.pieces = [" Hi", "!"]  # too short for a counted window: never flagged
    try:
        r = _client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=64)
    finally:
        fake.pieces = PIECES
    assert r.choices[0].message.content == " Hi!" and r.choices[0].finish_reason == "stop"
    reply = r.to_dict()["guard"]["reply"]
    assert reply["flagged"] is False and reply["tokens_judged"] == sum(map(len, _piece_ids(tok, [" Hi", "!"])))
    assert fake.aborted == 0


def test_an_engine_that_sends_no_token_ids_is_an_error_not_an_unread_reply(served):
    url, fake, _, _ = served
    fake.mode = "no_ids"
    try:
        with pytest.raises(APIError) as err:
            _client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=64)
    finally:
        fake.mode = "ok"
    assert err.value.code == "upstream_unavailable" and "token ids" in err.value.message


def test_a_scoring_copy_for_upstream_keeps_the_reply_guards_layers(parts, tmp_path):
    """`serve --upstream --reply-guard`: the guard's copy is cut below the deepest state either
    guard reads, so a reply guard reading deeper than the prompt guard still has its layers."""
    from pyvene_harm.decoder_depth import layers_to_run
    from pyvene_harm.recipes.serve import _reply_guard_states

    _, _, guard = parts
    guard.save(tmp_path / "rg")
    assert _reply_guard_states(str(tmp_path / "rg")) == list(guard.states_) == [1, 2]
    assert _reply_guard_states(None) == [] and _reply_guard_states(str(tmp_path / "missing")) == []
    assert layers_to_run(4, [1, *_reply_guard_states(str(tmp_path / "rg"))]) == 2


def test_chunks_that_arrive_during_a_read_are_read_together_and_errors_still_surface():
    import asyncio
    import json

    from pyvene_harm.serve.errors import ApiError
    from pyvene_harm.serve.upstream import _batches

    class Response:
        def __init__(self, lines):
            self.lines = lines

        async def aiter_lines(self):
            for line in self.lines:
                await asyncio.sleep(0.001)
                yield line

    def line(i):
        return "data: " + json.dumps({"choices": [{"text": str(i), "token_ids": [i]}]})

    async def consume(lines, coalesce):
        sizes = []
        async for batch in _batches(Response(lines), coalesce=coalesce):
            sizes.append(len(batch))
            await asyncio.sleep(0.02)  # a read of the guard's copy
        return sizes

    lines = [line(i) for i in range(12)] + ["data: [DONE]"]
    together = asyncio.run(consume(lines, True))
    assert sum(together) == 12 and len(together) < 12  # later batches hold what came meanwhile
    assert asyncio.run(consume(lines, False)) == [1] * 12
    failing = [line(0), line(1), "data: " + json.dumps({"error": {"message": "engine lost its worker"}})]
    with pytest.raises(ApiError, match="engine lost its worker"):
        asyncio.run(consume(failing, True))


class _StubReading:
    """A reply guard's read that flags at a chosen reply token (None: never)."""

    def __init__(self, flag_at, end_ids=()):
        self.flag_at, self.end_ids, self.read = flag_at, set(end_ids), []

    @property
    def tokens_read(self):
        return len(self.read)

    def end_of_reply(self, ids):
        return ids[:-1] if ids and ids[-1] in self.end_ids else list(ids)

    async def judge(self, ids):
        for t in ids:
            self.read.append(t)
            if self.flag_at is not None and len(self.read) - 1 == self.flag_at:
                return self.flag_at
        return None


@pytest.mark.parametrize("flag_at, relayed", [(None, 4), (0, 0), (1, 0), (2, 2), (4, 2), (5, 3)])
def test_a_flag_inside_pieces_read_together_relays_exactly_the_pieces_before_it(flag_at, relayed):
    """Pieces of 2, 0 (text held back: its tokens came earlier), 3 and 1 tokens read in one
    batch: a piece is relayed only if every token of it comes before the flagged one."""
    import asyncio

    engine = UpstreamEngine("http://127.0.0.1:1")
    pieces = [{"text": "ab", "token_ids": [1, 2]}, {"text": "c", "token_ids": []},
              {"text": "def", "token_ids": [3, 4, 5]}, {"text": "g", "token_ids": [6]}]
    reading = _StubReading(flag_at)
    flagged, n = asyncio.run(engine._read(reading, pieces))
    assert (flagged, n) == (flag_at, relayed)


def test_the_end_of_turn_that_ends_a_reply_is_not_read_as_in_process():
    import asyncio

    engine = UpstreamEngine("http://127.0.0.1:1")
    reading = _StubReading(None, end_ids=[99])
    pieces = [{"text": "ab", "token_ids": [1, 2]}, {"text": "", "token_ids": [99], "finish_reason": "stop"}]
    assert asyncio.run(engine._read(reading, pieces)) == (None, 2) and reading.read == [1, 2]
    reading = _StubReading(None, end_ids=[99])
    cut = [{"text": "ab", "token_ids": [1, 2]}, {"text": "c", "token_ids": [3], "finish_reason": "length"}]
    assert asyncio.run(engine._read(reading, cut)) == (None, 2) and reading.read == [1, 2, 3]


def test_a_reply_read_waits_for_no_batch_and_is_not_counted_against_the_queue(parts):
    """A read of a reply in flight runs before queued jobs, without the batching wait, and does
    not take a place of --max-queue (its request already holds one)."""
    import asyncio

    from pyvene_harm.serve import GuardWorker
    from pyvene_harm.serve.jobs import CallJob

    model, tok, _ = parts
    prompt_guard = LatentGuard(model, tok, batch_size=4).fit(["bomb", "malware", "bread", "tides"], [1, 1, 0, 0])
    worker = GuardWorker(prompt_guard, model, tok, max_wait_ms=3000, max_queue=1)
    worker.start()
    try:
        async def go():
            call = CallJob(asyncio.get_running_loop(), lambda: "read")
            start = time.monotonic()
            worker.submit(call, in_hand=True)
            value = await asyncio.wait_for(call.future, 10)
            return value, time.monotonic() - start, worker.snapshot()["outstanding"]

        value, took, outstanding = asyncio.run(go())
        assert value == "read" and took < 1.5 and outstanding == 0
    finally:
        worker.stop()


def test_replies_read_at_once_are_capped_and_a_finished_one_frees_its_place(parts):
    """Each upstream reply read keeps its KV cache until the reply ends: past --max-reply-reads,
    a chat is answered 429 in OpenAI's shape, and once a reply ends its place is free again."""
    import threading

    from openai import RateLimitError

    from pyvene_harm.serve import Limits

    model, tok, guard = parts
    prompt_guard = LatentGuard(model, tok, batch_size=4).fit(["bomb", "malware", "bread", "tides"], [1, 1, 0, 0])
    prompt_guard.threshold_ = 1e9
    fake = FakeEngine(tok)
    fake.pieces, fake.mode, fake.delay_s = [" Hi", "!"], "slow", 0.5  # too short to be flagged
    msgs = [{"role": "user", "content": "Hello"}]
    with serve_in_thread(fake.app) as engine_url:
        upstream = check_upstream(UpstreamEngine(engine_url, timeout_s=10.0), tok)
        app = create_app(prompt_guard, model, tok, model_name="m", engine=upstream, reply_guard=guard,
                         limits=Limits(max_reply_reads=1))
        with serve_in_thread(app) as url:
            first: list = []
            t = threading.Thread(target=lambda: first.append(
                _client(url).chat.completions.create(model="m", messages=msgs, max_tokens=16)))
            t.start()
            deadline = time.monotonic() + 10
            while not fake.requests and time.monotonic() < deadline:  # the first reply is being relayed
                time.sleep(0.02)
            with pytest.raises(RateLimitError) as err:
                _client(url).chat.completions.create(model="m", messages=msgs, max_tokens=16)
            assert "--max-reply-reads 1" in err.value.body["message"]
            t.join(30)
            assert first and first[0].choices[0].message.content == " Hi!"
            fake.delay_s = 0.0
            again = _client(url).chat.completions.create(model="m", messages=msgs, max_tokens=16)
            assert again.choices[0].message.content == " Hi!"
