"""Long library calls show progress by default in a terminal, and stay quiet elsewhere."""

from __future__ import annotations

import io
import sys

from pyvene_harm.generation import generate_replies
from pyvene_harm.positions import ChatFormatter
from pyvene_harm.progress import progress_bar, progress_label, wanted

from tiny import make_tokenizer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stderr(monkeypatch, stream):
    # set inside the test body: pytest puts its own capture back on sys.stderr after fixtures run
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_auto_follows_whether_stderr_is_a_terminal(monkeypatch):
    _stderr(monkeypatch, Terminal())
    assert wanted(None) and wanted(True) and wanted("label") and not wanted(False)
    assert progress_label(None, "answering") == "answering" and progress_label(False, "answering") is False
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not wanted(None) and wanted(True)
    assert progress_label(None, "answering") is False and progress_label(True, "answering") == "answering"
    monkeypatch.setattr(sys, "stderr", None)  # pythonw, some daemons
    assert not wanted(None)


def test_the_bar_counts_and_estimates(monkeypatch):
    terminal = _stderr(monkeypatch, Terminal())
    with progress_bar(None, total=3, description="scoring prompts") as advance:
        advance(2)
        advance(1)
    shown = terminal.getvalue()
    assert "scoring prompts" in shown and "3/3" in shown and "left" in shown


def test_generate_replies_shows_progress_by_default_in_a_terminal_only(tiny_llama, monkeypatch):
    terminal = _stderr(monkeypatch, Terminal())
    fmt = ChatFormatter(make_tokenizer("qwen2.5"))
    shown = generate_replies(tiny_llama, fmt, ["Hello", "How are you?"], max_new_tokens=4)
    assert "generating" in terminal.getvalue() and "2/2" in terminal.getvalue()
    # the bar ticks through the decoding steps and changes no reply
    assert shown == generate_replies(tiny_llama, fmt, ["Hello", "How are you?"], max_new_tokens=4, progress=False)

    quiet = _stderr(monkeypatch, Terminal())
    generate_replies(tiny_llama, fmt, ["Hello"], max_new_tokens=2, progress=False)
    assert quiet.getvalue() == ""

    log = _stderr(monkeypatch, io.StringIO())  # a pipe or a log file: no bar unless asked for
    generate_replies(tiny_llama, fmt, ["Hello"], max_new_tokens=2)
    assert log.getvalue() == ""


def test_a_batch_moves_the_bar_token_by_token_and_ends_on_its_share():
    import torch

    from pyvene_harm.generation import _Tick

    moves = []
    tick = _Tick(moves.append, rows=2, max_new_tokens=4)
    for _ in range(3):  # the replies end after 3 of 4 tokens
        assert not tick(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 10)).any()
    tick.finish()
    assert moves[:3] == [0.5, 0.5, 0.5] and sum(moves) == 2


def test_asked_for_in_a_log_it_writes_plain_lines_now_and_then(monkeypatch):
    """The CLI forces progress on; under nohup or in CI stderr is a file, where rich would draw the
    bar only at the end: a plain line every LOG_EVERY_S seconds and one at the end instead."""
    import pyvene_harm.progress as progress

    clock = iter([0.0, 10.0, 31.0, 45.0, 70.0, 75.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    log = _stderr(monkeypatch, io.StringIO())
    with progress.progress_bar(True, total=4, description="reading replies") as advance:
        for _ in range(4):
            advance(1)  # at 10, 31 (a line: 30 s since the start), 45, 70 (done: no line until the end)
    assert log.getvalue().splitlines() == ["reading replies: 2/4 after 0:00:31, about 0:00:31 left",
                                           "reading replies: 4/4 after 0:01:15"]
    quiet = _stderr(monkeypatch, io.StringIO())
    with progress.progress_bar(None, total=2, description="x") as advance:  # auto in a log: nothing
        advance(2)
    assert quiet.getvalue() == ""
