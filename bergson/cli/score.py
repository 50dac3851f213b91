"""``bergson score RUN_PATH --model M --dataset D --query_path QUERY_STORE [--score individual|mean|max]``"""

from __future__ import annotations

from ..config import ScoreConfig
from . import report_store

CONFIG = ScoreConfig


def run(cfg: ScoreConfig) -> None:
    from ..scoring import score

    store = score(cfg)  # None on a rank that wrote a node-local copy (report_store prints nothing there)
    orientation = store.manifest.score["orientation"] if store is not None and store.manifest.score else ""
    report_store(store, orientation, cfg.top_k)
