"""What the digits workload's workers share: the model (logistic regression as one linear layer)
and the result file. The peer workers run in the peers' own virtual environments and import
nothing of bergson's; this file needs only torch and the standard library."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

FEATURES, CLASSES = 64, 10


class LogReg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def write_result(
    out_dir: Path, tool: str, method: str, settings: dict[str, Any], shape: tuple[int, ...], start: float
) -> None:
    """``out_dir/result.json``: the tool and its version, the method and settings, the scores'
    shape, the worker's own seconds since ``start`` and its peak RSS."""
    import importlib.metadata as md

    result = {
        "tool": tool,
        "version": md.version(tool),
        "method": method,
        "settings": settings,
        "scores_shape": list(shape),
        "worker_s": round(time.perf_counter() - start, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
