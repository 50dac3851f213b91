"""The allocator settings the ``bergson`` program applies at start (bergson/core/allocator.py).

Each case runs in a fresh interpreter: the settings are process-wide and stay once applied."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Four 16 MiB arrays allocated and freed, ten times after a warm-up: the share of their pages
# that fault in again each round (0 when freed memory is reused).
PROBE = """
import json, resource
import numpy as np
from bergson.core.allocator import keep_freed_memory
applied = keep_freed_memory()
n = 4 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    a = [np.ones(n, dtype=np.float32) for _ in range(4)]; del a
f0 = faults()
for _ in range(10):
    a = [np.ones(n, dtype=np.float32) for _ in range(4)]; del a
print(json.dumps({"applied": applied, "refaulted": (faults() - f0) / 10 / (4 * n * 4 / 4096)}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_tensors_reuse_mapped_pages_and_glibcs_defaults_do_not():
    tuned, system = probe(), probe(BERGSON_MALLOC="system")
    assert tuned["applied"] and not system["applied"]
    assert tuned["refaulted"] < 0.01
    # glibc's own trimming returns part of the freed heap to the kernel, which faults it back in
    assert system["refaulted"] > 0.05


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}])
def test_the_callers_own_allocator_settings_win(env):
    # (a preloaded library that is not there only makes the loader warn)
    assert not probe(**env)["applied"]
