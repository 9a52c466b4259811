"""Rich progress bars: on by default where someone is watching, free when switched off.

A long call that prints nothing looks hung: extracting directions on 60 prompts writes a
128-token reply to each, many minutes on a CPU. So every long library call takes
``progress: bool | str | None = None``: ``None`` (the default) shows a bar when stderr is a
terminal and stays quiet in pipes, logs and tests; ``True`` or a label forces it on (the CLI
does): in a log or a pipe that is a plain line every 30 seconds and one at the end, since rich
draws a bar there only once it is done; ``False`` turns it off.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

__all__ = ["Progress", "progress_bar", "progress_label", "wanted"]

Progress = bool | str | None
"""``None``: auto (on when stderr is a terminal); ``True`` / a label: on; ``False``: off."""


def wanted(progress: Progress) -> bool:
    """Whether ``progress`` asks for a bar here and now (``None``: is stderr a terminal?)."""
    if progress is None:
        stream = sys.stderr
        return stream is not None and hasattr(stream, "isatty") and stream.isatty()
    return bool(progress)


def progress_label(progress: Progress, label: str) -> str | bool:
    """``label`` when a bar is wanted, else ``False``: how a call hands its switch, named, to
    the calls it makes (``progress and "label"`` would drop the label of the auto default)."""
    return label if wanted(progress) else False


@contextlib.contextmanager
def progress_bar(enabled: Progress, *, total: int, description: str = "working") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a rich bar on stderr when ``enabled`` asks for one (on rank 0
    only when data-parallel: the other ranks stay quiet).

    The bar counts done / total, the time spent (it ticks between updates, so a slow first batch
    does not look hung) and the time left.

    Example::

        with progress_bar(None, total=len(prompts), description="scoring") as advance:
            for batch in batches:
                ...
                advance(len(batch))
    """
    from .distributed import is_main

    if not wanted(enabled) or not is_main():
        yield lambda n=1: None
        return
    stream = sys.stderr
    if stream is None or not (hasattr(stream, "isatty") and stream.isatty()):
        # asked for (the CLI does) but written to a log or a pipe, where rich draws the bar only when
        # it ends: a plain line now and then, so that a job run under nohup or in CI does not look hung
        with _log_lines(stream, total, description) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    with RichProgress(
        # narrow enough for an 80-column terminal with a 30-character label
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("left"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


LOG_EVERY_S = 30.0
"""Seconds between the plain progress lines written where stderr is not a terminal."""


@contextlib.contextmanager
def _log_lines(stream, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` that writes ``description: done/total, elapsed, about left`` at most every
    :data:`LOG_EVERY_S` seconds, and once at the end."""
    import time

    start = last = time.monotonic()
    done = 0.0

    def line(now: float) -> str:
        elapsed = now - start
        left = f", about {_clock(elapsed * (total - done) / done)} left" if 0 < done < total else ""
        return f"{description}: {done:g}/{total} after {_clock(elapsed)}{left}\n"

    def advance(n: float = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= LOG_EVERY_S and done < total:
            last = now
            if stream is not None:
                stream.write(line(now))
                stream.flush()

    yield advance
    if stream is not None:
        stream.write(line(time.monotonic()))
        stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
