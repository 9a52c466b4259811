"""Which rank failed, and why: the notes ranks leave for each other in the job's store.

A collective that fails only says that a connection dropped or a wait timed out. So every
rank writes its host and process id when it joins, the number of each collective it enters,
and, when it raises, its error; a rank whose collective fails reads those notes and names the
peer: the one that wrote an error, the one whose process is gone, or the one that never
reached the step. Keys are per session, so one process can run several sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass

__all__ = ["FailureBoard", "PeerFailure"]


class PeerFailure(RuntimeError):
    """Another rank failed, was killed or stopped answering; the message names it and the cause."""


@dataclass(frozen=True)
class FailureBoard:
    """One rank's view of the notes of one :func:`~pyvene_harm.distributed.data_parallel` session."""

    session: int
    rank: int
    world_size: int
    timeout: float

    def reached(self, step: int) -> None:
        """Note that this rank entered collective number ``step``."""
        _store().set(self.key("step", self.rank), str(step))

    def key(self, kind: str, rank: int) -> str:
        return f"pyvene_harm/{self.session}/{kind}/{rank}"

    def register(self) -> None:
        """Note this rank's host and process id, so that a peer can tell whether it still runs."""
        _store().set(self.key("proc", self.rank), json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))

    def report(self, err: BaseException) -> None:
        """Leave this rank's cause in the store, where the peers that notice the failure read it."""
        cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no message'}"
        with contextlib.suppress(Exception):
            _store().set(self.key("failed", self.rank), cause[:500])

    def diagnose(self, what: str, err: Exception, step: int) -> str:
        """One message naming the peer behind this rank's failed collective number ``step``."""
        peers = [r for r in range(self.world_size) if r != self.rank]
        deadline = time.monotonic() + 2.0  # a failing peer writes its cause before it exits
        while True:
            causes = {r: _get(self.key("failed", r)) for r in peers}
            found = [f"rank {r} failed: {c}" for r, c in causes.items() if c]
            if found:
                return "; ".join(found)
            dead = [r for r in peers if self._process_gone(r)]
            if dead or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if dead:
            return "; ".join(f"rank {r} ended without an error message while {what}: it was killed (a signal, "
                             "or the out-of-memory killer) or crashed" for r in dead)
        steps = {r: _get(self.key("step", r)) for r in peers}
        behind = [r for r, s in steps.items() if s is not None and int(s) < step]
        if behind:
            return "; ".join(f"rank {r} did not reach step {step} ({what}) within {self.timeout:g} s: it "
                             "is stuck, or was killed on another machine" for r in behind)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"another rank stopped answering while {what} ({first}): see its own message above"

    def _process_gone(self, rank: int) -> bool:
        info = _get(self.key("proc", rank))
        if info is None:
            return False
        proc = json.loads(info)
        if proc["host"] != socket.gethostname():
            return False
        try:
            with open(f"/proc/{proc['pid']}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has exited
        except OSError:
            try:
                os.kill(proc["pid"], 0)
            except ProcessLookupError:
                return True
            except OSError:
                return False
            return False


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _get(key: str) -> str | None:
    try:
        store = _store()
        return store.get(key).decode() if store.check([key]) else None
    except Exception:  # the store went away with the rank that hosted it
        return None
