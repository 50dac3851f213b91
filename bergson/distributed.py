"""Several worker processes on torch.distributed: set-up, rank helpers, collectives, launching.

Two ways to start N workers, with the same result::

    torchrun --nproc_per_node N -m bergson build ...   # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
                                                       # MASTER_ADDR and MASTER_PORT for each worker
    bergson build ... --nproc_per_node N               # bergson starts N local workers (:func:`launch`)

Every rank loads the model and tokenizes the data itself (deterministically, so that all agree),
then takes its share of the dataset's shards (``ekfac``: of its documents); rank 0 alone writes
the shared files of an output (a store's manifest, its config, EK-FAC's stages). A rank on a
machine that does not see rank 0's output directory (no shared filesystem: it does not find
the launch marker rank 0 leaves there, :func:`node_local_ranks`) writes a store's shards into a
copy of its own and sends them to rank 0 at the end (:func:`send_files`); commands whose later
steps read rank 0's files on every rank refuse such launches (:func:`require_shared_directory`).
Outside a launch everything here is a no-op for a world of one. Every rank logs with its rank
(``bergson (rank 3): ...``); only rank 0 shows a progress bar, of its own share (the shares
are balanced, so it tracks the whole run).

Process group: NCCL for CUDA tensors and gloo for CPU ones (``cpu:gloo,cuda:nccl`` on a GPU,
plain gloo on the CPU), plus a gloo group for control messages (barriers, small objects). Its
timeout is long on purpose (``--dist_timeout``, two hours by default): ranks reach the last
barrier at different times (the slowest rank's last shard, then rank 0's finalize or
eigendecomposition), and a short collective timeout would kill runs that are merely uneven.

Faults: a rank that raises prints its error naming its rank and exits non-zero; the launcher
(:func:`launch`, or torchrun's agent) then stops the other ranks. Without a launcher to stop
them, the barrier names the ranks that did not arrive (gloo's monitored barrier) as soon as a
peer's connection closes, or after the timeout. Completed shards stay on disk, so rerunning
the same command resumes.

Under a launch, ``--device auto`` (or ``cuda``) means ``cuda:LOCAL_RANK`` on a CUDA machine.
torch is imported lazily here, so that the command line's ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from .core.devices import launched, local_rank, resolve_device
from .errors import BergsonError

logger = logging.getLogger(__name__)

SPAWNED = "BERGSON_SPAWNED"
"""Set by :func:`launch` in its workers: the launching process reports the result, not rank 0."""

PEER_EXIT = 3
"""Exit status of a rank that stops because another rank failed (the launcher names the other)."""

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


def reports() -> bool:
    """Whether this process prints a command's summary: rank 0, unless :func:`launch` started
    it (then the launching process prints it)."""
    return env_rank() == 0 and SPAWNED not in os.environ


# ---------------------------------------------------------------------- set-up and shutdown


def init(device: Any = None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group of a torchrun-style launch; True if this call created it.

    Nothing happens outside a launch, for a world of one, or when a group already exists (one
    the caller made is used as it is). ``device`` (a torch.device) picks the backend: NCCL with
    gloo for CPU tensors when it is a CUDA device (made the current one), else gloo.
    """
    global _control, _timeout
    if is_active() or env_world_size() <= 1:
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
    if is_active() or env_world_size() <= 1:
        return

    init(resolve_device(getattr(cfg, "device", "auto")), getattr(cfg, "dist_timeout", DEFAULT_TIMEOUT))


def shutdown() -> None:
    """Leave the process group (if this process has one)."""
    global _control, _timeout
    if is_active():
        import torch.distributed as dist

        dist.destroy_process_group()
    _control = _timeout = None


# ---------------------------------------------------------------------- collectives


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


# ---------------------------------------------------------------------- machines without a shared filesystem

LAUNCH_MARKER = ".bergson-launch"
"""A file rank 0 leaves in a directory for a moment, holding a random token of this launch: a
rank that reads the same token there sees rank 0's directory (it shares its filesystem)."""

CHUNK_BYTES = 64 << 20
"""The most bytes of a file sent in one message (so that a file never has to fit in memory)."""


def write_marker(root: str | Path) -> str:
    """Write a fresh random token into ``root``'s launch marker (rank 0; ``root`` exists); returns it."""
    token = secrets.token_hex(16)
    path = Path(root) / LAUNCH_MARKER
    tmp = path.with_name(f"{LAUNCH_MARKER}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w") as f:
        f.write(token)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token


def sees_marker(root: str | Path, token: str) -> bool:
    """Whether ``root`` holds the launch marker with ``token`` (so it is rank 0's directory)."""
    try:
        # a fresh listing first: a network filesystem may cache that the name did not exist
        if LAUNCH_MARKER not in os.listdir(root):
            return False
        return (Path(root) / LAUNCH_MARKER).read_text().strip() == token
    except OSError:
        return False


def clear_marker(root: str | Path) -> None:
    """Remove ``root``'s launch marker (rank 0, once every rank has looked)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(root) / LAUNCH_MARKER).unlink()


def node_local_ranks(root: str | Path) -> list[int]:
    """The ranks that do not see rank 0's directory ``root`` (which rank 0 has created): those on
    machines without a filesystem shared with rank 0's. Collective; [] in a world of one."""
    if world_size() == 1:
        return []
    token = broadcast(on_rank_zero(lambda: write_marker(root), f"writing a marker into {root}"))
    assert token is not None
    sees = all_gather_objects(rank() == 0 or sees_marker(root, token))
    if rank() == 0:
        clear_marker(root)
    return [r for r, ok in enumerate(sees) if not ok]


def require_shared_directory(root: str | Path, command: str, why: str) -> None:
    """Fail on every rank when some rank does not see rank 0's directory ``root`` (collective)."""
    local = node_local_ranks(root)
    if local:
        ranks = ", ".join(map(str, local))
        raise BergsonError(
            f"bergson {command} needs a shared filesystem for its run_path: rank(s) {ranks} do not see "
            f"rank 0's directory {root} ({why}); put run_path on a filesystem that every machine "
            "mounts at the same path, or run on one machine"
        )


def send_array(array: Any, dst: int) -> None:
    """Send a numpy array to rank ``dst`` (which calls :func:`recv_array`), in pieces of at most
    64 MiB over the CPU group."""
    import numpy as np
    import torch
    import torch.distributed as dist

    array = np.ascontiguousarray(array)
    dist.send_object_list([(array.dtype.str, array.shape)], dst=dst, group=_control)
    flat = array.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, CHUNK_BYTES):
        dist.send(torch.from_numpy(flat[start : start + CHUNK_BYTES]), dst=dst, group=_control)


def recv_array(src: int) -> Any:
    """The numpy array rank ``src`` sends with :func:`send_array`."""
    import numpy as np
    import torch
    import torch.distributed as dist

    header: list[Any] = [None]
    dist.recv_object_list(header, src=src, group=_control)
    dtype, shape = header[0]
    out = np.empty(shape, np.dtype(dtype))
    flat = out.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, CHUNK_BYTES):
        dist.recv(torch.from_numpy(flat[start : start + CHUNK_BYTES]), src=src, group=_control)
    return out


def send_files(paths: list[Path], dst: int) -> None:
    """Send the files ``paths`` to rank ``dst`` (which calls :func:`recv_files`): a header (the
    chunk size, then each file's size, -1 for a file that does not exist), then the files' bytes
    in chunks of that size (the last one of a file shorter), as uint8 CPU tensors on the
    control group (gloo), so that no file has to fit in memory."""
    import numpy as np
    import torch
    import torch.distributed as dist

    with contextlib.ExitStack() as stack:
        handles = []
        for path in paths:
            try:
                handles.append(stack.enter_context(open(path, "rb")))
            except FileNotFoundError:
                handles.append(None)
        sizes = [os.fstat(h.fileno()).st_size if h is not None else -1 for h in handles]
        chunk = max(1, min(CHUNK_BYTES, max(sizes, default=0)))
        dist.send(torch.tensor([chunk, *sizes], dtype=torch.int64), dst=dst, group=_control)
        buf = np.empty(chunk, np.uint8)
        for h, size in zip(handles, sizes):
            left = size
            while h is not None and left > 0:
                want, got = min(left, chunk), 0
                while got < want:
                    n = h.readinto(buf.data[got:want])
                    if not n:
                        raise BergsonError(f"{h.name} shrank while being sent to rank {dst}")
                    got += n
                dist.send(torch.from_numpy(buf[:want]), dst=dst, group=_control)
                left -= want


def recv_files(paths: list[Path], src: int) -> list[Path | None]:
    """Receive the files rank ``src`` sends with :func:`send_files`, each into a temporary name
    next to its path (written, fsynced); returns those names (None for a file ``src`` lacks).
    The caller renames them into place, in the order that keeps its files consistent."""
    import torch
    import torch.distributed as dist

    header = torch.empty(len(paths) + 1, dtype=torch.int64)
    dist.recv(header, src=src, group=_control)
    chunk, *sizes = header.tolist()
    buf = torch.empty(chunk, dtype=torch.uint8)
    out: list[Path | None] = []
    for path, size in zip(paths, sizes):
        if size < 0:
            out.append(None)
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        out.append(tmp)
        try:
            with open(tmp, "wb") as f:
                left = size
                while left > 0:
                    part = buf[: min(left, chunk)]
                    dist.recv(part, src=src, group=_control)
                    f.write(part.numpy().data)
                    left -= part.numel()
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            for t in out:
                if t is not None:
                    t.unlink(missing_ok=True)
            raise
    return out


# ---------------------------------------------------------------------- FSDP2


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: modules whose class transformers names in ``_no_split_modules``
    (GPTNeoXLayer, LlamaDecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise BergsonError(
            f"--fsdp: cannot find the decoder layers of this {type(model).__name__} (its _no_split_modules "
            f"is {sorted(names) or 'empty'}); run without --fsdp"
        )
    return layers


def shard_model(model: Any, device: Any) -> Any:
    """Shard ``model`` over the ranks with FSDP2: ``fully_shard`` on each decoder layer, then on
    the whole model (embeddings and head). Each rank keeps 1/world of every weight; a layer
    gathers its weights for its forward and again for its backward, so gradient hooks on the
    layers' linear modules see ordinary tensors. In one process (no launch) a process group of
    one is made, so ``--fsdp`` on a single device runs the same code path."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not is_active():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    logger.info("model sharded with FSDP2 over %d rank(s)", world_size())
    return model


def is_sharded(model: Any) -> bool:
    """Whether ``model`` (or a submodule) was sharded by FSDP2."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def model_class(model: Any) -> type:
    """The model's own class (FSDP2 swaps a sharded module's class for a subclass of it)."""
    if not is_sharded(model):
        return type(model)
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def lockstep(model: Any, steps: int) -> int:
    """How many forward/backward steps this rank must run when it has ``steps`` of its own:
    the most any rank has, for a model sharded over several ranks (each of its layers gathers
    weights collectively, so every rank must run every step); ``steps`` otherwise."""
    if world_size() == 1 or not is_sharded(model):
        return steps
    import torch
    import torch.distributed as dist

    count = torch.tensor([steps], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=_control)
    return int(count.item())


# ---------------------------------------------------------------------- commands and launching


def _commands() -> dict[type, str]:
    from .config import (
        EkfacConfig,
        IndexConfig,
        MagicConfig,
        PreconditionerConfig,
        ReduceConfig,
        ScoreConfig,
        TrackstarConfig,
    )

    return {
        IndexConfig: "build",
        ReduceConfig: "reduce",
        ScoreConfig: "score",
        PreconditionerConfig: "preconditioner",
        EkfacConfig: "ekfac",
        MagicConfig: "magic",
        TrackstarConfig: "trackstar",
    }


DISTRIBUTED_COMMANDS = ("build", "reduce", "score", "preconditioner", "ekfac", "magic", "trackstar")
"""The commands that split their work over several ranks."""


def requested(cfg: Any) -> int:
    """The config's ``nproc_per_node`` (1 when it has none), checked."""
    n = getattr(cfg, "nproc_per_node", 1)
    if n < 1:
        raise BergsonError(f"--nproc_per_node {n}: must be at least 1")
    return n


def check_command(command: str, cfg: Any) -> None:
    """Refuse to run a command that does not split its work on several ranks."""
    if command in DISTRIBUTED_COMMANDS:
        return
    if requested(cfg) > 1 or env_world_size() > 1:
        raise BergsonError(
            f"bergson {command} does not run on several processes yet (only "
            f"{', '.join(DISTRIBUTED_COMMANDS)} do); run it as one process, without --nproc_per_node or torchrun"
        )


def refuse(cfg: Any, what: str) -> None:
    """Fail when ``what`` (work that runs in one process) is asked for on several ranks."""
    if requested(cfg) > 1 or env_world_size() > 1 or world_size() > 1:
        raise BergsonError(
            f"{what} runs in one process; drop --nproc_per_node (or start it without torchrun)"
        )


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Terminate the workers still running (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _wait(procs: list[subprocess.Popen]) -> None:
    """Wait for every worker; when one fails, stop the others and raise naming its rank."""
    n = len(procs)
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c is not None and c != 0]
        if failed:
            first = next((r for r in failed if codes[r] != PEER_EXIT), failed[0])
            _stop(procs)
            code = codes[first]
            assert code is not None
            raise BergsonError(
                f"rank {first} of {n} failed ({_describe_exit(code)}; its messages are above) and the "
                "other ranks were stopped; completed shards are kept, so rerunning the same command "
                "(once the cause is fixed) resumes"
            )
        if all(c == 0 for c in codes):
            return
        time.sleep(0.1)


def launch(cfg: Any) -> None:
    """Run ``cfg``'s command on ``cfg.nproc_per_node`` local workers and wait for them.

    Each worker is ``python -m bergson COMMAND --config CFG.yaml`` (the resolved config) with
    the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR=127.0.0.1 and a free MASTER_PORT); its output goes to this process's. Each
    worker gets ``OMP_NUM_THREADS`` = cores / workers unless it is set (torchrun sets 1). When
    a worker fails the others are stopped and a :class:`BergsonError` names its rank.
    """
    n = requested(cfg)
    command = _commands().get(type(cfg))
    if command is None:
        raise BergsonError(
            f"--nproc_per_node: {type(cfg).__name__} runs have no command to start workers with"
        )
    from .config import save_yaml

    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(n),
        LOCAL_WORLD_SIZE=str(n),
        GROUP_RANK="0",
        **{SPAWNED: "1"},
    )
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    logger.info("starting %d workers for bergson %s", n, command)
    with tempfile.TemporaryDirectory(prefix="bergson-workers-") as tmp:
        path = Path(tmp) / "config.yaml"
        save_yaml(cfg, path)
        procs: list[subprocess.Popen] = []
        try:
            for r in range(n):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bergson", command, "--config", str(path)],
                        env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    )
                )
            _wait(procs)
        finally:
            _stop(procs)


_F = TypeVar("_F", bound=Callable[..., Any])


def entry(
    result: Callable[[Any], Any], alone: Callable[[Any], str | None] | None = None
) -> Callable[[_F], _F]:
    """Decorate a command's entry point ``fn(cfg, ...)`` to run on several ranks.

    With ``cfg.nproc_per_node`` > 1 outside a launch, the workers are started (:func:`launch`)
    and ``result(cfg)`` (the output they wrote, read back) is returned. Under a launch, ``fn``
    runs in the process group (joined here when needed). ``alone(cfg)`` names the option that
    keeps a run in one process (None: it can be split); such runs on several ranks are refused.
    """

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            n = requested(cfg)
            reason = alone(cfg) if alone is not None else None
            if reason:
                refuse(cfg, reason)
            if n > 1 and not launched():
                if any(a is not None for a in (*args, *kwargs.values())):
                    raise BergsonError(
                        "--nproc_per_node: objects passed in Python (such as normalizers) cannot reach "
                        "the workers; use --optimizer_state, or start your script with torchrun"
                    )
                launch(cfg)
                return result(cfg)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", env_world_size()))
            if n > 1 and n != local:
                logger.warning("--nproc_per_node %d ignored: the launcher started %d ranks here", n, local)
            init_from(cfg)
            return fn(cfg, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
