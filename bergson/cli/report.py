"""``bergson report SOURCE --output report.html``"""

from __future__ import annotations

from ..config import ReportConfig

CONFIG = ReportConfig


def run(cfg: ReportConfig) -> None:
    from ..reports import report

    report(cfg)
