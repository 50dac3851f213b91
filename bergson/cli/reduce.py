"""``bergson reduce RUN_PATH (--model M --dataset D | --index STORE) --aggregation mean``"""

from __future__ import annotations

from ..config import ReduceConfig
from ..distributed import reports

CONFIG = ReduceConfig


def run(cfg: ReduceConfig) -> None:
    from ..reduction import reduce

    store = reduce(cfg)
    if not reports():
        return
    print(f"wrote {store!r}")
