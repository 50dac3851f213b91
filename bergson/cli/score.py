"""``bergson score RUN_PATH --model M --dataset D --query_path QUERY_STORE [--score individual|mean|max]``"""

from __future__ import annotations

from ..config import ScoreConfig
from ..distributed import reports
from . import print_top_rows

CONFIG = ScoreConfig


def run(cfg: ScoreConfig) -> None:
    from ..scoring import score

    store = score(cfg)
    if not reports():
        return
    print(f"wrote {store!r}")
    print(f"scores: {store.manifest.score['orientation'] if store.manifest.score else ''}")
    print_top_rows(store, cfg.top_k)
