"""``bergson ekfac RUN_PATH --model M --dataset D --query.dataset Q [--damping 0.1]``"""

from __future__ import annotations

from ..config import EkfacConfig
from . import report_store

CONFIG = EkfacConfig


def run(cfg: EkfacConfig) -> None:
    from ..methods.ekfac import ekfac

    orientation = "positive = training on the row lowers the query's loss (EK-FAC influence)"
    report_store(ekfac(cfg), orientation, cfg.top_k, "query")
