"""``bergson test_model_configuration --model M [--precision P] [--force_math_sdp] [--dataset D]``"""

from __future__ import annotations

from ..config import ModelConfigTestConfig
from ..errors import BergsonError

CONFIG = ModelConfigTestConfig


def run(cfg: ModelConfigTestConfig) -> None:
    from ..diagnostics import format_report, test_model_configuration

    report = test_model_configuration(cfg)
    print(format_report(report, message=report["consistent"]))
    if not report["consistent"]:
        raise BergsonError(report["message"])  # printed on stderr, exit status 1
