"""``bergson reduce RUN_PATH (--model M --dataset D | --index STORE) --aggregation mean``"""

from __future__ import annotations

from ..config import ReduceConfig

CONFIG = ReduceConfig


def run(cfg: ReduceConfig) -> None:
    from ..reduction import reduce

    store = reduce(cfg)
    print(f"wrote {store!r}")
