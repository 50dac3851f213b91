"""``bergson score RUN_PATH --model M --dataset D --query_path QUERY_STORE [--score individual|mean|max]``"""

from __future__ import annotations

from ..config import ScoreConfig

CONFIG = ScoreConfig


def run(cfg: ScoreConfig) -> None:
    from ..scoring import score, top_rows

    store = score(cfg)
    print(f"wrote {store!r}")
    print(f"scores: {store.manifest.score['orientation'] if store.manifest.score else ''}")
    for col, hits in enumerate(top_rows(store, cfg.top_k)):
        print(f"column {col}:")
        for rank, (row, value) in enumerate(hits, 1):
            print(f"  {rank:3d}. row {row:8d}  score {value:+.5g}")
