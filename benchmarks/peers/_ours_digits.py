"""Our scores on the classifier workload, one method per process (so that wall time and peak
RSS are measured from outside like every peer's): ``python -m benchmarks.peers._ours_digits
--workload digits.npz --method grad_dot --out_dir DIR`` writes ``DIR/scores.npy``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .digits import METHODS, load_workload, ours


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workload", type=Path, required=True)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, data, wd = load_workload(args.workload)
    np.save(args.out_dir / "scores.npy", ours(model, data, wd, args.method))


if __name__ == "__main__":
    main()
