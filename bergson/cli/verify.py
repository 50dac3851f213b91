"""``bergson verify STORE``"""

from __future__ import annotations

from ..config import VerifyConfig
from ..errors import BergsonError

CONFIG = VerifyConfig


def run(cfg: VerifyConfig) -> None:
    from ..store.verify import verify_store

    if not cfg.store:
        raise BergsonError("verify needs STORE: the directory of a store to check")
    report = verify_store(cfg.store)
    print(report)
    if not report.ok:
        raise BergsonError(
            f"{cfg.store} is damaged ({len(report.problems)} problems, listed above); rebuild the store "
            "(rerun the command that wrote it with --overwrite) or restore the files named from a copy"
        )
