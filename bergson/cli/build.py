"""``bergson build RUN_PATH --model M --dataset D ...``"""

from __future__ import annotations

from ..config import IndexConfig

CONFIG = IndexConfig


def run(cfg: IndexConfig) -> None:
    from ..indexing import build

    store = build(cfg)
    print(f"wrote {store!r}")
