"""A model too big for one device: FSDP2 sharding over the ranks (``--fsdp``).

``fully_shard`` goes on each decoder layer, then on the whole model, so each rank keeps 1/world
of every weight. The weight gathers are collective, so every rank must run every step
(:func:`lockstep`). FSDP2 is imported only for a run that shards.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..errors import BergsonError
from .group import cpu_group, is_active, world_size

logger = logging.getLogger(__name__)


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
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=cpu_group())
    return int(count.item())
