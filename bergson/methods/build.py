"""``bergson build``: the collection loop with a store writer as its sink."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from .. import distributed
from ..config import IndexConfig
from ..models import numerics
from ..runs.documents import prepare_inputs
from ..runs.shared_store import write_store
from ..store import GradientStore, load_gradients
from ..transforms.normalizers import Normalizer


@distributed.entry(lambda cfg: load_gradients(cfg.run_path))
def build(cfg: IndexConfig, normalizers: Mapping[str, Normalizer] | None = None) -> GradientStore:
    """Collect per-document gradients of ``cfg.data`` under ``cfg.model`` into a store
    (on ``cfg.nproc_per_node`` workers, or on the ranks of a torchrun launch).

    On a rank of a several-machine launch that does not see rank 0's ``run_path`` (no shared
    filesystem) it returns None: the store is on rank 0's machine."""
    with numerics(cfg):
        model, tokenizer, docs, max_tokens = prepare_inputs(cfg)
        store = write_store(cfg, model, docs, max_tokens, tokenizer.pad_token_id, normalizers)
        return cast(GradientStore, store)  # None only on such a node-local rank
