"""How a command runs under ``torchrun`` / ``accelerate launch``: one data-parallel session.

Every rank runs the same command; :mod:`pyvene_harm.distributed` splits the batches and
:class:`~pyvene_harm.recipes.rundir.RunDir` lets rank 0 alone write. Here the ranks other than
0 are silenced (at most one line of their own on stderr), a rank stopped by the launcher
unwinds cleanly (no half-written file), and a peer's failure becomes one error naming it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..distributed import DataParallel

__all__ = ["DATA_PARALLEL_COMMANDS", "check_data_parallel", "rank_session"]

DATA_PARALLEL_COMMANDS = ("extract", "beliefs", "cluster", "post-inst", "elicit", "invert", "guard fit",
                          "guard eval")
"""Commands that run data-parallel under a multi-rank launch; the others run in one process."""


def check_data_parallel(name: str, args: Sequence[str]) -> None:
    """Refuse, before anything runs, a command that has no data-parallel path."""
    from ..distributed import launched

    if not launched():
        return
    words = [name, *[a for a in args[:1] if not a.startswith("-")]]
    command = " ".join(words[:2]) if name == "guard" else name
    if command not in DATA_PARALLEL_COMMANDS and "--help" not in args and "-h" not in args:
        raise click.UsageError(
            f"`{command}` does not run data-parallel: start it without torchrun (one process). "
            f"Under torchrun: {', '.join(DATA_PARALLEL_COMMANDS)}")


class Stopped(BaseException):
    """SIGTERM from the launcher, which stops every rank when one fails: unwind, clean up."""


def _stop(signum, frame) -> None:
    raise Stopped(f"stopped by signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def rank_session(timeout: float) -> Iterator[None]:
    """The command's whole run as one :func:`~pyvene_harm.distributed.data_parallel` session.

    Rank 0 reports errors as usual (a peer's failure as one message naming it); the other
    ranks print at most one line, their own failure, and exit with its code.
    """
    from ..distributed import PeerFailure

    previous = signal.signal(signal.SIGTERM, _stop)
    dp = None
    try:
        with _joined(timeout) as dp:
            yield
    except (click.exceptions.Exit, click.Abort):
        raise
    except BaseException as err:
        main = dp is None or dp.main
        if isinstance(err, PeerFailure):
            if main:
                raise click.ClickException(
                    f"{err}. The job stopped on every rank; units finished before it are kept in the run "
                    "directory and the same command resumes from them") from None
            raise SystemExit(1) from None
        if (not main and not isinstance(err, click.UsageError)) or isinstance(err, Stopped):
            message = err.format_message() if isinstance(err, click.ClickException) else str(err)
            first = message.strip().splitlines()[0] if message.strip() else "no message"
            where = f"rank {dp.rank}/{dp.world_size}" if dp is not None else "rank ?"
            print(f"pyvene-harm {where}: {type(err).__name__}: {first}", file=sys.stderr, flush=True)
        if isinstance(err, Stopped):
            raise SystemExit(143) from None
        if main:
            raise
        raise SystemExit(getattr(err, "exit_code", 1)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _joined(timeout: float) -> Iterator[DataParallel | None]:
    """Join the process group (a clear error if that fails), silence the ranks other than 0."""
    from ..distributed import data_parallel

    stack = contextlib.ExitStack()
    try:
        dp = stack.enter_context(data_parallel(timeout))
    except Exception as err:
        raise click.ClickException(f"could not join the other ranks ({type(err).__name__}: {err}): check "
                                   "torchrun's --rdzv-endpoint / MASTER_ADDR and that every node started") from err
    with stack:
        if dp is not None and not dp.main:
            stack.enter_context(_silenced())
        yield dp


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Ranks other than 0 print nothing: rank 0 shows the tables, progress and errors."""
    import os

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        try:
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a dependency
            level = None
        try:
            yield
        finally:
            if level is not None:
                hf_logging.set_verbosity(level)
