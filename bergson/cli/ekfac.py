"""``bergson ekfac RUN_PATH --model M --dataset D --query.dataset Q [--damping 0.1]``"""

from __future__ import annotations

from ..config import EkfacConfig

CONFIG = EkfacConfig


def run(cfg: EkfacConfig) -> None:
    from ..methods.ekfac import ekfac
    from ..scoring import top_rows

    store = ekfac(cfg)
    print(f"wrote {store!r}")
    print("scores: positive = training on the row lowers the query's loss (EK-FAC influence)")
    for col, hits in enumerate(top_rows(store, cfg.top_k)):
        print(f"query {col}:")
        for rank, (row, value) in enumerate(hits, 1):
            print(f"  {rank:3d}. row {row:8d}  score {value:+.5g}")
