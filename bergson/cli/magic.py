"""``bergson magic CONFIG.yaml [--flags]`` (or every option as a flag)"""

from __future__ import annotations

from ..config import MagicConfig
from . import report_store

CONFIG = MagicConfig


def run(cfg: MagicConfig) -> None:
    from ..methods.magic.command import magic

    orientation = "positive = up-weighting the document lowers the query loss after training (MAGIC)"
    report_store(magic(cfg), orientation, cfg.top_k)
