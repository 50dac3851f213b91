"""``bergson convert SOURCE RUN_PATH [--model M]``"""

from __future__ import annotations

from ..config import ConvertConfig
from ..errors import BergsonError
from . import report_store

CONFIG = ConvertConfig


def run(cfg: ConvertConfig) -> None:
    from ..methods.compat import convert_store

    if not cfg.source or not cfg.run_path:
        raise BergsonError(
            "convert needs SOURCE (a store of the original package) and RUN_PATH (the new store)"
        )
    report_store(convert_store(cfg.source, cfg.run_path, model=cfg.model, overwrite=cfg.overwrite))
