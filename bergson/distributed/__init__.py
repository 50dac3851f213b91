"""Several worker processes on torch.distributed.

- :mod:`.group`: the process group (joining, leaving, which rank this is) and the collectives;
- :mod:`.transfer`: files and arrays between ranks, and machines without a shared filesystem;
- :mod:`.fsdp`: FSDP2 sharding of a model too big for one device (``--fsdp``);
- :mod:`.launch`: starting workers (``--nproc_per_node``), a command's entry point on them.

Every rank loads the model and tokenizes the data itself (deterministically, so that all agree),
then takes its share of the work, as the command table says (:mod:`bergson.core.commands`);
rank 0 alone writes the shared files of an output (a store's manifest, its config, EK-FAC's
stages). Outside a launch everything here is a no-op for a world of one. Every rank logs with
its rank (``bergson (rank 3): ...``); only rank 0 shows a progress bar, of its own share (the
shares are balanced, so it tracks the whole run). Under a launch, ``--device auto`` (or
``cuda``) means ``cuda:LOCAL_RANK`` on a CUDA machine.

The rest of bergson calls these as ``distributed.X``: the names below are the package's API
(the chunk size of transfers, :data:`.transfer.CHUNK_BYTES`, is set on its own module).
"""

from __future__ import annotations

from .fsdp import decoder_layers, is_sharded, lockstep, model_class, shard_model
from .group import (
    DEFAULT_TIMEOUT,
    PeerError,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast,
    control_group,
    cpu_group,
    env_rank,
    env_world_size,
    init,
    init_from,
    is_active,
    on_rank_zero,
    rank,
    reduce_sum,
    shutdown,
    world_size,
)
from .launch import (
    PEER_EXIT,
    SPAWNED,
    check_command,
    command_of,
    entry,
    free_port,
    hold_run_path,
    launch,
    refuse,
    reports,
    requested,
)
from .transfer import (
    LAUNCH_MARKER,
    clear_marker,
    node_local_ranks,
    recv_array,
    recv_files,
    require_shared_directory,
    sees_marker,
    send_array,
    send_files,
    write_marker,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "LAUNCH_MARKER",
    "PEER_EXIT",
    "SPAWNED",
    "PeerError",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "check_command",
    "clear_marker",
    "command_of",
    "control_group",
    "cpu_group",
    "decoder_layers",
    "entry",
    "env_rank",
    "env_world_size",
    "free_port",
    "hold_run_path",
    "init",
    "init_from",
    "is_active",
    "is_sharded",
    "launch",
    "lockstep",
    "model_class",
    "node_local_ranks",
    "on_rank_zero",
    "rank",
    "recv_array",
    "recv_files",
    "reduce_sum",
    "refuse",
    "reports",
    "requested",
    "require_shared_directory",
    "sees_marker",
    "send_array",
    "send_files",
    "shard_model",
    "shutdown",
    "world_size",
    "write_marker",
]
