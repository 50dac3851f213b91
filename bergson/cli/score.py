"""``bergson score RUN_PATH --model M --dataset D --query_path QUERY_STORE [--score individual|mean|max]``"""

from __future__ import annotations

from ..config import ScoreConfig
from . import report_store

CONFIG = ScoreConfig


def run(cfg: ScoreConfig) -> None:
    from ..scoring import score

    store = score(cfg)
    report_store(store, store.manifest.score["orientation"] if store.manifest.score else "", cfg.top_k)
