"""``bergson self_influence RUN_PATH --model M --dataset D [--method dot|trackstar|ekfac]``"""

from __future__ import annotations

from ..config import SelfInfluenceConfig
from . import report_store

CONFIG = SelfInfluenceConfig


def run(cfg: SelfInfluenceConfig) -> None:
    from ..methods.self_influence import ORIENTATION, self_influence

    report_store(self_influence(cfg), ORIENTATION, cfg.top_k, f"self-influence ({cfg.method})")
    print(f"ranked list and histogram: bergson report {cfg.run_path}/scores --output self_influence.html")
