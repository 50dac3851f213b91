"""``bergson source RUN_PATH --models C1 C2 ... --segment_steps K1 K2 ... --segment_learning_rates η1 η2 ...
--dataset D --query.dataset Q`` (or ``--segments TRAINER_DIR ...`` instead of the three)"""

from __future__ import annotations

from ..config import SourceConfig
from . import report_store

CONFIG = SourceConfig


def run(cfg: SourceConfig) -> None:
    from ..methods.source import source

    orientation = (
        "positive = training on the row lowers the query's loss (SOURCE, unrolled over the segments)"
    )
    report_store(source(cfg), orientation, cfg.top_k, "query")
