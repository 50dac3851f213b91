"""Which device a process computes on, and which worker of a launch it is (read from the
environment a torchrun-style launcher sets): the bottom floor, importing nothing of ours."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import BergsonError

if TYPE_CHECKING:
    import torch

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The environment a torchrun-style launcher gives every worker."""


def launched() -> bool:
    """Whether this process was started by a torchrun-style launcher (the environment says so)."""
    return all(v in os.environ for v in LAUNCH_VARS)


def local_rank() -> int:
    """This process's rank on its machine (0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) if launched() else 0


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU. Under a torchrun-style launch, 'auto' and
    'cuda' mean this worker's own GPU, cuda:LOCAL_RANK."""
    import torch

    if device in ("auto", "cuda") and launched() and torch.cuda.is_available():
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise BergsonError(
                f"--device {device}: local rank {index} has no GPU of its own ({torch.cuda.device_count()} "
                "here); start at most one process per GPU, or pass --device cpu"
            )
        return torch.device("cuda", index)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BergsonError(f"--device: cannot parse {device!r} ({e}); use auto, cpu or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BergsonError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev
