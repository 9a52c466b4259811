"""Data-parallel runs on torch.distributed: one process per GPU (or CPU share), same results.

Launched by ``torchrun`` or ``accelerate launch`` (which set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR``), every rank runs the same program on its own copy of the
model. Inside :func:`data_parallel`, collection (:func:`~pyvene_harm.collect.collect_states`,
and so statistics, beliefs and the Latent Guard) and generation split their *batches*
round-robin over the ranks: the same length-sorted batches, with the same shared template
prefix, that one process forms. Each rank runs its own batches and receives the others', so
every rank sees exactly the states and replies one process would compute, in the same order,
and every sum downstream is added in the same order: results are bit-identical for any number
of ranks (an ``all_reduce`` of per-rank float64 totals would change their last bits). Only
rank 0 should write files and print (:func:`is_main`, :func:`on_main`).

A rank that fails reports its cause to the others through the process group's store; a rank
whose peer fails, is killed or stops answering raises :class:`PeerFailure` naming that rank.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .rank_failures import FailureBoard, PeerFailure

__all__ = ["DataParallel", "PeerFailure", "active", "data_parallel", "device_for", "exchange_batches",
           "gather_rows", "is_main", "launched", "on_main"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 1800.0
"""Seconds a collective waits for a silent peer (torch's own default for gloo)."""

AUTO_REFUSED = ("--device auto (one model spread over several GPUs) cannot be combined with torchrun, "
                "which runs one copy of the model per rank: launch a single process for a model too "
                "large for one GPU, or pass --device cuda (each rank uses cuda:LOCAL_RANK)")


def launched() -> bool:
    """True in a process started by torchrun / accelerate launch with more than one rank."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for(requested: str | None) -> str | None:
    """The device this process loads its model on: ``requested`` unchanged in a single process;
    under a multi-rank launch ``cuda:LOCAL_RANK`` (or CPU without CUDA), never ``auto``.

    Example:
        >>> load_model("demo", device=device_for(None))  # doctest: +SKIP
    """
    if not launched():
        return requested
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        raise ValueError(AUTO_REFUSED)
    if requested is not None and requested.startswith("cuda:"):
        raise ValueError(f"--device {requested}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device "
                         "cuda (or leave it out) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if requested == "cuda" or (requested is None and torch.cuda.is_available()):
        return f"cuda:{local}"
    return requested or "cpu"


@dataclass
class DataParallel:
    """This rank's place in the job, and the collectives the library uses (each one turns a
    peer's failure into a :class:`PeerFailure`)."""

    rank: int
    world_size: int
    timeout: float
    board: FailureBoard = field(repr=False)
    _step: int = field(default=0, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def own(self, batches: Sequence[T]) -> list[T]:
        """This rank's share of ``batches``: every ``world_size``-th one, from its rank on."""
        return list(batches[self.rank::self.world_size])

    # --- collectives ----------------------------------------------------------------

    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._collective("exchanging results", dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        self._collective("receiving rank 0's result", dist.broadcast_object_list, box, 0)
        return box[0]

    def all_gather_tensor(self, tensor: Any) -> list[Any]:
        import torch
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective("exchanging states", dist.all_gather, out, tensor)
        return out

    def _collective(self, what: str, fn: Callable, *args: Any) -> None:
        self._step += 1
        try:
            self.board.reached(self._step)
            fn(*args)
        except Exception as err:  # gloo/nccl errors, timeouts, a vanished store
            raise PeerFailure(self.board.diagnose(what, err, self._step)) from err


_ACTIVE: DataParallel | None = None
_SESSIONS = 0


def active() -> DataParallel | None:
    """The running :func:`data_parallel` session, or None in a single process."""
    return _ACTIVE


def is_main() -> bool:
    """True on rank 0, and in a single process: the one that writes files and prints."""
    return _ACTIVE is None or _ACTIVE.main


@contextlib.contextmanager
def data_parallel(timeout: float = DEFAULT_TIMEOUT) -> Iterator[DataParallel | None]:
    """Run the body data-parallel when launched with several ranks; a no-op otherwise.

    Starts the process group if nobody has (gloo on CPU, gloo + nccl with CUDA, ``timeout``
    seconds for a silent peer) and keeps it for later sessions of the process (it ends at exit,
    unless a rank failed). Every rank must make the same library calls in the same order; a
    rank that raises leaves its cause for the others. The session ends when every rank has
    reached its end, so that what rank 0 wrote is complete when any rank moves on.

    Example (``torchrun --nproc-per-node 4 extract.py``):
        >>> with data_parallel():
        ...     ex = extract_directions(model, tok, harmful, harmless)   # same on every rank
        ...     if is_main():
        ...         ex.directions.save("directions")
    """
    global _ACTIVE, _SESSIONS
    if _ACTIVE is not None or not launched():
        yield _ACTIVE
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: run in one process")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
        # ending it here would race a peer already starting its next session: end it at exit
        atexit.register(_end_process_group)
    _SESSIONS += 1
    rank, world_size = dist.get_rank(), dist.get_world_size()
    board = FailureBoard(session=_SESSIONS, rank=rank, world_size=world_size, timeout=timeout)
    board.register()
    dp = DataParallel(rank=rank, world_size=world_size, timeout=timeout, board=board)
    _ACTIVE = dp
    try:
        # everyone has joined before anyone may leave (gloo ends a rank's join before its peers')
        dp._collective("joining the other ranks", dist.barrier)
        yield dp
        # and nobody leaves before rank 0 has written what the session produced
        dp._collective("waiting for rank 0 to finish writing", dist.barrier)
    except BaseException as err:
        global _FAILED
        _FAILED = True
        if not isinstance(err, PeerFailure):
            board.report(err)
        raise
    finally:
        _ACTIVE = None


_FAILED = False


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and not _FAILED:  # after a failure the peers may be gone: just exit
        dist.destroy_process_group()


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only (reading or writing files), its result shared with every rank.

    An exception in ``fn`` is raised on every rank, so all ranks stop the same way.
    """
    dp = _ACTIVE
    if dp is None:
        return fn()
    error: BaseException | None = None
    out: Any = None
    if dp.main:
        try:
            out = ("ok", fn())
        except Exception as err:
            error = err
            out = ("error", err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}"))
    out = dp.broadcast_object(out)
    if out[0] == "error":
        raise error if error is not None else out[1]
    return out[1]


def _picklable(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True


def gather_rows(rows: Mapping[int, T], n: int, *, key: str = "") -> list[T]:
    """Every rank's ``{prompt index: row}`` as one list in prompt order, on every rank.

    ``key`` (e.g. a hash of the prompts) must agree on every rank. Example: per-prompt guard
    features computed on each rank's own batches, as one list for fitting on every rank.
    """
    dp = _ACTIVE
    merged: dict[int, T] = dict(rows)
    if dp is not None:
        merged = {}
        parts = dp.all_gather_object((key, dict(rows)))
        _same_key([k for k, _ in parts])
        for _, part in parts:
            merged.update(part)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"no rank returned rows for prompts {missing[:5]}: the ranks split the prompts "
                           "differently (do all ranks read the same prompt files?)")
    return [merged[i] for i in range(n)]


def _same_key(keys: list[str]) -> None:
    odd = [r for r, k in enumerate(keys) if k != keys[0]]
    if odd:
        raise RuntimeError(f"rank {odd[0]} was given different prompts or options from rank 0: every rank "
                           "must read the same prompt files with the same options")


def exchange_batches(own: Iterator[tuple[list[int], dict[str, Any]]], plan: Sequence[Sequence[int]], *,
                     device: Any, key: str = "") -> Iterator[tuple[list[int], dict[str, Any]]]:
    """Every batch of ``plan``, in order, on every rank, from this rank's own ones.

    ``own`` yields ``(prompt indices, {name: tensor [b, ...]})`` for batches ``rank``,
    ``rank + world_size``, ... of ``plan`` (see :meth:`DataParallel.own`). Round by round each
    rank runs its next batch and the ranks swap them (``all_gather``); received tensors are
    placed on ``device`` with the same layout as a single process's, so that downstream
    arithmetic is the same too. ``key`` (e.g. a hash of the prompts) must agree on every rank.
    """
    import torch

    dp = _ACTIVE
    if dp is None:
        yield from own
        return
    comm = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    for first in range(0, len(plan), dp.world_size):
        item = next(own) if first + dp.rank < len(plan) else None
        header = None if item is None else (
            list(item[0]), [(k, tuple(v.shape[1:]), v.dtype) for k, v in item[1].items()])
        headers = dp.all_gather_object((key, header) if first == 0 else header)
        if first == 0:
            _same_key([h[0] for h in headers])
            headers = [h[1] for h in headers]
        for r, h in enumerate(headers):
            if h is not None and h[0] != list(plan[first + r]):
                raise RuntimeError(f"rank {r} formed batch {first + r} differently from rank {dp.rank}: every "
                                   "rank must load the same tokenizer and prompts")
        specs = {repr(h[1]) for h in headers if h is not None}
        if len(specs) != 1:
            raise RuntimeError(f"the ranks' batches differ in shape ({sorted(specs)}): every rank must "
                               "load the same model and ask for the same states")
        spec = next(h[1] for h in headers if h is not None)
        width = max(len(h[0]) for h in headers if h is not None)
        send = torch.zeros((width, len(spec), *spec[0][1]), dtype=spec[0][2], device=comm)
        if item is not None:
            send[:len(item[0])] = torch.stack([item[1][k] for k, _, _ in spec], dim=1).to(comm)
        received = dp.all_gather_tensor(send)
        for r, h in enumerate(headers):
            if h is None:
                continue
            if r == dp.rank:
                yield item
                continue
            buf = received[r][:len(h[0])].to(device)
            yield h[0], {k: buf[:, j] for j, (k, _, _) in enumerate(spec)}
    if next(own, None) is not None:
        raise RuntimeError("this rank has batches left over: the ranks formed different batches")
