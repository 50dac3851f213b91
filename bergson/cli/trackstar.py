"""``bergson trackstar RUN_PATH --model M --dataset D --query.dataset Q [--optimizer_state OPT]``"""

from __future__ import annotations

from ..config import TrackstarConfig
from ..distributed import reports

CONFIG = TrackstarConfig


def run(cfg: TrackstarConfig) -> None:
    from ..methods.trackstar import trackstar

    store = trackstar(cfg)
    if not reports():
        return
    print(f"wrote {store!r}")
    print(f"top {cfg.top_k} per query: {cfg.run_path}/summary.md (and top_k.jsonl)")
