"""``bergson magic CONFIG.yaml [--flags]`` (or every option as a flag)"""

from __future__ import annotations

from ..config import MagicConfig

CONFIG = MagicConfig


def run(cfg: MagicConfig) -> None:
    from ..methods.magic import magic
    from ..scoring import top_rows

    store = magic(cfg)
    print(f"wrote {store!r}")
    print("scores: positive = up-weighting the document lowers the query loss after training (MAGIC)")
    for col, hits in enumerate(top_rows(store, cfg.top_k)):
        print(f"column {col}:")
        for rank, (row, value) in enumerate(hits, 1):
            print(f"  {rank:3d}. row {row:8d}  score {value:+.5g}")
