"""``bergson trak RUN_PATH --models M1 M2 ... --dataset D --query.dataset Q [--stores S1 S2 ...]``"""

from __future__ import annotations

from ..config import TrakConfig
from . import report_store

CONFIG = TrakConfig


def run(cfg: TrakConfig) -> None:
    from ..methods.trak import trak

    if report_store(trak(cfg)):
        print(f"each model's scores: {cfg.run_path}/model_<i>/scores")
