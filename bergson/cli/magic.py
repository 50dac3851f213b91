"""``bergson magic CONFIG.yaml [--flags]`` (or every option as a flag)"""

from __future__ import annotations

from ..config import MagicConfig
from ..distributed import reports
from . import print_top_rows

CONFIG = MagicConfig


def run(cfg: MagicConfig) -> None:
    from ..methods.magic.command import magic

    store = magic(cfg)
    if not reports():
        return
    print(f"wrote {store!r}")
    print("scores: positive = up-weighting the document lowers the query loss after training (MAGIC)")
    print_top_rows(store, cfg.top_k)
