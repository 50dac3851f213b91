"""``bergson unroll RUN_PATH --model TRAINED --dataset D --query.dataset Q --training.* ...`` (or a YAML)"""

from __future__ import annotations

from ..config import UnrollConfig
from . import report_store

CONFIG = UnrollConfig


def run(cfg: UnrollConfig) -> None:
    from ..methods.magic.unroll import unroll

    orientation = "positive = up-weighting the document lowers the query loss after training (as MAGIC)"
    report_store(unroll(cfg), orientation, cfg.top_k)
