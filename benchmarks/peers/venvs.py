"""One virtual environment per peer under ``benchmarks/.venvs/`` (kept out of git).

Each peer from PyPI gets ``python -m venv``, then ``pip install torch==2.13.0`` (the local CPU
build; an unpinned torch would pull a multi-GB CUDA one), then the peer pinned to a version
with torch pinned again, then an import check. A marker file records the recipe and timings;
a venv without it (an interrupted set-up) is recreated. kronfluence and the published bergson
have their own recipes in ``kronfluence_ekfac.py`` and ``published_bergson.py``.

    python -m benchmarks.peers.venvs traker dattri
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .published_bergson import (
    INSTALL_MARKER,
    _step,
    clear_interrupted_venv,
    dir_size_mb,
    log,
    peer_versions,
)

REPO = Path(__file__).resolve().parents[2]
VENV_ROOT = REPO / "benchmarks" / ".venvs"
TORCH_VERSION = "2.13.0"


@dataclass(frozen=True)
class Recipe:
    name: str
    """Folder name under ``benchmarks/.venvs`` and the peer's PyPI name."""
    version: str
    extra: tuple[str, ...]
    """More requirements installed with the peer (torch is always pinned)."""
    check: str
    """Python run in the venv after installing; must exit 0."""


RECIPES = {
    "traker": Recipe(
        "traker",
        "0.3.2",
        # Not the [fast] extra: fast_jl is a CUDA kernel; the CPU run uses traker's BasicProjector.
        ("numpy", "tqdm"),
        "import trak, trak.projectors, torch; assert torch.__version__.startswith('2.13')",
    ),
    "dattri": Recipe(
        "dattri",
        "0.3.0",
        ("numpy", "scipy", "tqdm", "pyyaml"),
        "import dattri.algorithm.trak, dattri.task, torch; assert torch.__version__.startswith('2.13')",
    ),
}


def ensure(recipe: Recipe, root: Path = VENV_ROOT) -> dict[str, Any]:
    """Create ``root/recipe.name`` unless a complete one at the same version exists."""
    venv = root / recipe.name
    python = venv / "bin" / "python"
    marker = venv / INSTALL_MARKER
    if python.is_file() and marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("version") == recipe.version:
            info["reused"] = True
            info["path"] = str(venv)
            return info
        log(f"{venv} holds {recipe.name} {info.get('version')}, want {recipe.version}; recreating it")
    clear_interrupted_venv(venv)
    log_file = root / f"{recipe.name}-install.log"
    log_file.write_text("")
    pip = [str(python), "-I", "-m", "pip"]
    torch_pin = f"torch=={TORCH_VERSION}"
    steps = {
        "venv_s": _step([sys.executable, "-I", "-m", "venv", str(venv)], log_file),
        "torch_s": _step([*pip, "install", torch_pin], log_file),
        "peer_s": _step(
            [*pip, "install", torch_pin, *recipe.extra, f"{recipe.name}=={recipe.version}"], log_file
        ),
        "check_s": _step([str(python), "-I", "-c", recipe.check], log_file),
    }
    info: dict[str, Any] = {
        "version": recipe.version,
        "recipe": [
            f"python -m venv benchmarks/.venvs/{recipe.name}",
            f"pip install {torch_pin}",
            f"pip install {torch_pin} {' '.join(recipe.extra)} {recipe.name}=={recipe.version}",
        ],
        "install_s": round(sum(steps.values()), 1),
        "steps": steps,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "log": str(log_file),
    }
    info["size_mb"] = round(dir_size_mb(venv), 1)
    info["versions"] = peer_versions(venv, venv, (recipe.name, "torch", "numpy"))
    marker.write_text(json.dumps(info, indent=2))
    info["reused"] = False
    info["path"] = str(venv)
    return info


def main() -> None:
    names = sys.argv[1:] or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; choose from {sorted(RECIPES)}")
    print(json.dumps({n: ensure(RECIPES[n]) for n in names}, indent=2))


if __name__ == "__main__":
    main()
