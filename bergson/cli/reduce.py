"""``bergson reduce RUN_PATH (--model M --dataset D | --index STORE) --aggregation mean``"""

from __future__ import annotations

from ..config import ReduceConfig
from . import report_store

CONFIG = ReduceConfig


def run(cfg: ReduceConfig) -> None:
    from ..reduction import reduce

    report_store(reduce(cfg))
