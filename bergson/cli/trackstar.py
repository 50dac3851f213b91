"""``bergson trackstar RUN_PATH --model M --dataset D --query.dataset Q [--optimizer_state OPT]``"""

from __future__ import annotations

from ..config import TrackstarConfig
from . import report_store

CONFIG = TrackstarConfig


def run(cfg: TrackstarConfig) -> None:
    from ..methods.trackstar import trackstar

    if report_store(trackstar(cfg)):
        print(f"top {cfg.top_k} per query: {cfg.run_path}/summary.md (and top_k.jsonl)")
