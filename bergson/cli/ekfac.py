"""``bergson ekfac RUN_PATH --model M --dataset D --query.dataset Q [--damping 0.1]``"""

from __future__ import annotations

from ..config import EkfacConfig
from ..distributed import reports
from . import print_top_rows

CONFIG = EkfacConfig


def run(cfg: EkfacConfig) -> None:
    from ..methods.ekfac import ekfac

    store = ekfac(cfg)
    if not reports():  # a worker of a launch: the launching process (or rank 0) prints
        return
    print(f"wrote {store!r}")
    print("scores: positive = training on the row lowers the query's loss (EK-FAC influence)")
    print_top_rows(store, cfg.top_k, "query")
