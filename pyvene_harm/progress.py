"""Rich progress bars that cost nothing when switched off."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(enabled: bool | str, *, total: int, description: str = "working") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a rich bar on stderr when ``enabled`` is truthy (on rank 0
    only when data-parallel: the other ranks stay quiet)."""
    from .distributed import is_main

    if not enabled or not is_main():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
