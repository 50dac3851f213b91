"""``bergson build RUN_PATH --model M --dataset D ...``"""

from __future__ import annotations

import time

from ..config import IndexConfig
from ..distributed import reports

CONFIG = IndexConfig


def run(cfg: IndexConfig) -> None:
    from ..methods.build import build

    started, start = time.time(), time.perf_counter()
    store = build(cfg)
    elapsed = time.perf_counter() - start
    if not reports():
        return
    if (store.root / "manifest.json").stat().st_mtime < started:
        print(f"{store!r} was already complete")
        return
    tokens = int(store.rows["num_tokens"].sum())
    rate = tokens / max(elapsed, 1e-9)
    print(f"wrote {store!r}: {tokens:,} tokens in {elapsed:.1f}s ({rate:,.0f} tokens/s end to end)")
