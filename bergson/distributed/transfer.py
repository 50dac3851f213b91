"""Files and arrays between ranks, and machines that do not share a filesystem.

A rank on a machine that does not see rank 0's output directory (it does not find the launch
marker rank 0 leaves there, :func:`node_local_ranks`) writes a store's shards into a copy of
its own and sends them to rank 0 at the end (:func:`send_files`); commands whose later steps
read rank 0's files on every rank refuse such launches (:func:`require_shared_directory`).
Everything is sent over the CPU (gloo) group in chunks of at most :data:`CHUNK_BYTES`, so that
no file has to fit in memory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_bytes
from ..errors import BergsonError
from .group import all_gather_objects, broadcast, cpu_group, on_rank_zero, rank, world_size

LAUNCH_MARKER = ".bergson-launch"
"""A file rank 0 leaves in a directory for a moment, holding a random token of this launch: a
rank that reads the same token there sees rank 0's directory (it shares its filesystem)."""

CHUNK_BYTES = 64 << 20
"""The most bytes of a file sent in one message (so that a file never has to fit in memory)."""


def write_marker(root: str | Path) -> str:
    """Write a fresh random token into ``root``'s launch marker (rank 0; ``root`` exists); returns it."""
    token = secrets.token_hex(16)
    atomic_write_bytes(Path(root) / LAUNCH_MARKER, token.encode())
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


def _pieces(flat: Any) -> Iterator[Any]:
    """A flat uint8 numpy array as CPU tensors of at most :data:`CHUNK_BYTES` that share its memory."""
    import torch

    for start in range(0, flat.size, CHUNK_BYTES):
        yield torch.from_numpy(flat[start : start + CHUNK_BYTES])


def send_array(array: Any, dst: int) -> None:
    """Send a numpy array to rank ``dst`` (which calls :func:`recv_array`), in pieces of at most
    64 MiB over the CPU group."""
    import numpy as np
    import torch.distributed as dist

    group = cpu_group()
    array = np.ascontiguousarray(array)
    dist.send_object_list([(array.dtype.str, array.shape)], dst=dst, group=group)
    for piece in _pieces(array.reshape(-1).view(np.uint8)):
        dist.send(piece, dst=dst, group=group)


def recv_array(src: int) -> Any:
    """The numpy array rank ``src`` sends with :func:`send_array`."""
    import numpy as np
    import torch.distributed as dist

    group = cpu_group()
    header: list[Any] = [None]
    dist.recv_object_list(header, src=src, group=group)
    dtype, shape = header[0]
    out = np.empty(shape, np.dtype(dtype))
    for piece in _pieces(out.reshape(-1).view(np.uint8)):
        dist.recv(piece, src=src, group=group)
    return out


def send_files(paths: list[Path], dst: int) -> None:
    """Send the files ``paths`` to rank ``dst`` (which calls :func:`recv_files`): a header (the
    chunk size, then each file's size, -1 for a file that does not exist), then the files' bytes
    in chunks of that size (the last one of a file shorter), as uint8 CPU tensors on the
    control group (gloo), so that no file has to fit in memory."""
    import numpy as np
    import torch
    import torch.distributed as dist

    group = cpu_group()
    with contextlib.ExitStack() as stack:
        handles = []
        for path in paths:
            try:
                handles.append(stack.enter_context(open(path, "rb")))
            except FileNotFoundError:
                handles.append(None)
        sizes = [os.fstat(h.fileno()).st_size if h is not None else -1 for h in handles]
        chunk = max(1, min(CHUNK_BYTES, max(sizes, default=0)))
        dist.send(torch.tensor([chunk, *sizes], dtype=torch.int64), dst=dst, group=group)
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
                dist.send(torch.from_numpy(buf[:want]), dst=dst, group=group)
                left -= want


def recv_files(paths: list[Path], src: int) -> list[Path | None]:
    """Receive the files rank ``src`` sends with :func:`send_files`, each into a temporary name
    next to its path (written, fsynced); returns those names (None for a file ``src`` lacks).
    The caller renames them into place, in the order that keeps its files consistent."""
    import torch
    import torch.distributed as dist

    group = cpu_group()
    header = torch.empty(len(paths) + 1, dtype=torch.int64)
    dist.recv(header, src=src, group=group)
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
                    dist.recv(part, src=src, group=group)
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
