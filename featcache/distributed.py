"""torchrun support: the same command, whole shards split across ranks.

Not DistributedSampler: it pads with duplicates and interleaves samples across shards,
while here each rank owns a contiguous range of whole shards and writes only those.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from featcache.errors import FeatcacheError

T = TypeVar("T")


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def env_rank() -> int:
    """This process's global rank as torchrun announces it (valid before and after the
    process group exists; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), if any.

    Joined once per process and left at its exit: a script that calls `extract` and
    then `probe` on the same ranks reuses the group (destroying and re-creating it in
    between could hang a rank on torchrun's rendezvous store, which rank 0 serves)."""
    if is_distributed() and not tdist.is_initialized():
        backend = "nccl" if _gpu_per_rank() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        tdist.init_process_group(backend=backend)
        atexit.register(_leave)
    try:
        yield
    except BaseException:  # this rank leaves on an error: it does not wait for the others
        _FAILED.append(True)
        raise


def _leave() -> None:
    """Leave the group together: a gloo rank that tears down its connections while the
    other still uses them can abort the other at exit ("terminate called without an
    active exception", seen once in tests/test_dp_step.py after a finished run), so
    after a run that ended well the gloo ranks meet first, for at most `_LEAVE_WAIT`
    seconds. A rank leaving on an error does not wait (torchrun stops the others once it
    is gone), nor does NCCL (its barrier is a collective that could meet a peer's)."""
    if not (tdist.is_available() and tdist.is_initialized()) or _PEER_DIED:
        return
    if not _FAILED and tdist.get_backend() == "gloo":
        # a rank that is gone or late: leave without it
        with contextlib.suppress(RuntimeError):
            tdist.monitored_barrier(timeout=datetime.timedelta(seconds=_LEAVE_WAIT))
    tdist.destroy_process_group()


_LEAVE_WAIT = 60
_FAILED: list[bool] = []


# What gloo and NCCL say when the process at the other end of a collective is gone
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "Connection refused", "NCCL communicator was aborted", "remote process exited")
_PEER_DIED: list[int] = []


def peer_died(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank died (`kill -9`, out of
    memory), or None for any other error. With two ranks the dead one is the other."""
    if not isinstance(exc, RuntimeError) or not (tdist.is_available()
                                                 and tdist.is_initialized()):
        return None
    if not any(sign in str(exc) for sign in _PEER_GONE):
        return None
    _PEER_DIED.append(1)  # the group is broken: leaving it would wait on the dead rank
    me, n = rank(), world_size()
    who = f"rank {1 - me}" if n == 2 else f"another of the {n} ranks"
    return (f"{who} died (killed, or out of memory?) while rank {me} was working with it; "
            "this rank stops too: run the same command again (finished work is kept)")


def _gpu_per_rank() -> bool:
    """NCCL needs a GPU of its own for each rank of a node; with more ranks than GPUs
    (two on one GPU, to check the code paths) the ranks share them over gloo, which
    reduces CUDA tensors too."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return torch.cuda.is_available() and torch.cuda.device_count() >= local


def one_process_only(command: str) -> None:
    """Refuse, on every rank, a command that runs in one process when torchrun started
    several (each rank would do the whole work, and race for the same output files)."""
    if is_distributed():
        from featcache.errors import RankError

        raise RankError(f"`featcache {command}` runs in one process, not under torchrun "
                        f"(this is rank {env_rank()} of {os.environ.get('WORLD_SIZE')}); run "
                        "it without torchrun")


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s object on every rank (a no-op in one process)."""
    if world_size() == 1:
        return obj
    box: list[Any] = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(values: list[int]) -> list[int]:
    """Element-wise sum over ranks (every rank gets it; a no-op in one process)."""
    if world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if tdist.get_backend() == "nccl" else "cpu"
    box = torch.tensor(values, dtype=torch.int64, device=device)
    tdist.all_reduce(box)
    return [int(v) for v in box.tolist()]


def gather_or_fail(payload: Any, failure: BaseException | None) -> list[Any]:
    """Every rank's payload, on every rank; but when any rank failed, every rank raises:
    the failing rank its own exception, the others one line naming it. So an error on
    one rank stops all of them, instead of leaving them waiting at the next collective."""
    if world_size() == 1:
        if failure is not None:
            raise failure
        return [payload]
    message = None if failure is None else (
        str(failure) if isinstance(failure, FeatcacheError)
        else f"{type(failure).__name__}: {failure}")
    box: list[Any] = [None] * world_size()
    tdist.all_gather_object(box, (message, None if failure is not None else payload))
    if failure is not None:
        raise failure
    for r, (msg, _) in enumerate(box):
        if msg is not None:
            raise FeatcacheError(f"rank {r} failed: {msg}")
    return [p for _, p in box]


def split_evenly(items: list[T], part: int, parts: int) -> list[T]:
    """The `part`-th of `parts` contiguous, near-equal slices of `items`."""
    base, extra = divmod(len(items), parts)
    start = part * base + min(part, extra)
    return items[start:start + base + (1 if part < extra else 0)]


def resolve_device(device: str) -> torch.device:
    """`auto`: this rank's GPU under torchrun, else the GPU if any, else the CPU."""
    if device == "auto":
        if is_distributed() and torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise FeatcacheError(f"bad --device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise FeatcacheError(f"bad --device {device!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FeatcacheError(f"--device {device} asked for, but torch sees no CUDA GPU; "
                             "use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None \
            and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise FeatcacheError(f"--device {device}: this machine has {count} CUDA GPU"
                             f"{'s' if count != 1 else ''} (cuda:0 … cuda:{count - 1})")
    return resolved
