"""The process group: joining and leaving it, who this rank is, and the collectives.

Backends: NCCL for CUDA tensors and gloo for CPU ones (``cpu:gloo,cuda:nccl`` on a GPU, plain
gloo on the CPU), plus a gloo group for control messages (barriers, small objects, files). Its
timeout is long on purpose (``--dist_timeout``, two hours by default): ranks reach the last
barrier at different times (the slowest rank's last shard, then rank 0's finalize or
eigendecomposition), and a short collective timeout would kill runs that are merely uneven.
Without a launcher to stop them, the barrier names the ranks that did not arrive (gloo's
monitored barrier) as soon as a peer's connection closes, or after the timeout.

Outside a launch everything here is a no-op for a world of one; torch.distributed is imported
only once it is needed.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from ..core.devices import launched, local_rank, resolve_device
from ..errors import BergsonError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 7200.0

_T = TypeVar("_T")
_control: Any = None  # gloo group for barriers and objects (None: the default group is gloo)
_timeout: timedelta | None = None  # the timeout init() gave the process group


class PeerError(BergsonError):
    """This rank stopped because another rank failed (or could not be reached)."""


# ---------------------------------------------------------------------- who am I


def env_world_size() -> int:
    """The launch's number of ranks (1 when not launched)."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def env_rank() -> int:
    """This process's rank according to the launch environment (0 when not launched)."""
    return int(os.environ["RANK"]) if launched() else 0


def is_active() -> bool:
    """Whether a torch.distributed process group is initialized in this process."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    if not is_active():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    """Number of ranks in the process group (1 without one)."""
    if not is_active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


# ---------------------------------------------------------------------- set-up and shutdown


def _joins() -> bool:
    """Whether :func:`init` would create a group: launched with several ranks, and none yet."""
    return not is_active() and env_world_size() > 1


def init(device: Any = None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group of a torchrun-style launch; True if this call created it.

    Nothing happens outside a launch, for a world of one, or when a group already exists (one
    the caller made is used as it is). ``device`` (a torch.device) picks the backend: NCCL with
    gloo for CPU tensors when it is a CUDA device (made the current one), else gloo.
    """
    global _control, _timeout
    if not _joins():
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise BergsonError("this torch build has no torch.distributed; run a single process")
    dev = torch.device("cpu" if device is None else device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.set_device(dev)
    wait = timedelta(seconds=timeout)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=wait)
    _control = dist.new_group(backend="gloo", timeout=wait) if cuda else None
    _timeout = wait
    logger.info(
        "rank %d of %d joined (local rank %d, %s, timeout %.0fs)",
        dist.get_rank(),
        dist.get_world_size(),
        local_rank(),
        "nccl+gloo" if cuda else "gloo",
        timeout,
    )
    return True


def init_from(cfg: Any) -> None:
    """:func:`init` with a config's device and ``dist_timeout``."""
    if _joins():
        init(resolve_device(getattr(cfg, "device", "auto")), getattr(cfg, "dist_timeout", DEFAULT_TIMEOUT))


def shutdown() -> None:
    """Leave the process group (if this process has one)."""
    global _control, _timeout
    if is_active():
        import torch.distributed as dist

        dist.destroy_process_group()
    _control = _timeout = None


# ---------------------------------------------------------------------- collectives


def cpu_group() -> Any:
    """The group :func:`init` made for CPU tensors and objects, as it stands (None: the default
    group); unlike :func:`control_group`, it never makes one."""
    return _control


def control_group() -> Any:
    """The group for CPU tensors and small objects: None (the default group) when that is
    gloo, else a gloo group made on first use, as when a launcher such as accelerate made an
    NCCL default group. Collective on first use: every rank must call it at the same point."""
    global _control
    if world_size() > 1 and _control is None:
        import torch.distributed as dist

        if dist.get_backend() != "gloo":
            _control = dist.new_group(backend="gloo")
    return _control


def barrier(what: str = "a barrier") -> None:
    """Wait for every rank. A rank that has died or does not arrive within the timeout is
    named in the error (gloo's monitored barrier)."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    if _control is None and dist.get_backend() != "gloo":  # a caller's own NCCL group
        dist.barrier()
        return
    try:
        # monitored_barrier's own default timeout is 30 minutes, not the group's
        wait = _timeout or timedelta(seconds=DEFAULT_TIMEOUT)
        dist.monitored_barrier(group=_control, timeout=wait, wait_all_ranks=True)
    except RuntimeError as e:
        raise PeerError(f"rank {rank()} lost the other ranks at {what}: {e}") from e


def broadcast(obj: _T, src: int = 0) -> _T:
    """``obj`` as rank ``src`` has it, on every rank (a small picklable object)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control)
    return box[0]


def all_gather_objects(obj: _T) -> list[_T]:
    """Every rank's ``obj`` (a small picklable object), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control)
    return out


def all_reduce_sum(tensor: Any) -> Any:
    """Sum ``tensor`` over ranks, in place (NCCL for CUDA tensors, gloo for CPU ones); returns it."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_sum(tensor: Any, dst: int) -> Any:
    """Sum ``tensor`` over ranks into rank ``dst``'s copy (the other ranks' copies are left
    undefined); returns it."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM)
    return tensor


def on_rank_zero(fn: Callable[[], _T], what: str) -> _T | None:
    """Run ``fn`` on rank 0 while the other ranks wait; its result there (None elsewhere).

    An error on rank 0 is raised on every rank, so no rank is left waiting: rank 0 raises its
    own, the others a :class:`PeerError` with its message.
    """
    if world_size() == 1:
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    message = broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise PeerError(f"rank 0 failed while {what} ({message})")
    return result
