"""EK-FAC's damping against retraining on the LM quality benchmark's workload.

Does a smaller or larger ``--damping`` than the default 0.1 (relative) bring EK-FAC's agreement
with retraining up, and ASTRA's (``--ihvp astra``: the damped Gauss-Newton system it solves moves
with the damping too)? For each damping, the cached run's EK-FAC factors (``ekfac/``: covariances,
eigenbases, corrected eigenvalues) are copied into a run directory of its own, where ``bergson
ekfac`` recomputes only the preconditioned queries and the scores; ``bergson validate`` then
measures LDS (16 retrains without half the documents), leave-2%-out and leave-5%-out Spearman
from the cached retrains (``--cache_dir``; the first run retrains, later runs read them).

    python -m benchmarks.quality.ekfac_damping [--run runs/quality_lm/run_bee8c4a5c0] [--dampings 1 0.1 0.01]
    python -m benchmarks.quality.ekfac_damping --ihvp astra [--ihvp_steps 20] --dampings 1 0.3 0.1

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

STAGES = ("covariances", "eigen", "corrected")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--run", default="runs/quality_lm/run_bee8c4a5c0")
    parser.add_argument("--work", default="runs/ekfac_damping")
    parser.add_argument("--cache_dir", default="runs/quality_lm/retrains")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1.0, 0.1, 0.03, 0.01, 0.003])
    parser.add_argument("--subsets", type=int, default=16)
    parser.add_argument("--ihvp", choices=["ekfac", "astra"], default="ekfac")
    parser.add_argument("--ihvp_steps", type=int, default=20, help="ASTRA's iterations")
    args = parser.parse_args()

    from bergson import EkfacConfig, ekfac
    from bergson.config import ValidateConfig, load_yaml
    from bergson.validation import validate

    run, work = Path(args.run), Path(args.work)
    base = load_yaml(EkfacConfig, run / "ekfac" / "ekfac.yaml")
    tag = ""
    if args.ihvp != "ekfac":
        base = replace(base, ihvp=args.ihvp, ihvp_steps=args.ihvp_steps)
        tag = f"{args.ihvp}{args.ihvp_steps}_"
    stores = {}
    for damping in args.dampings:
        out = work / f"{tag}damping_{damping:g}"
        if not (out / "scores" / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for stage in STAGES:  # the factors do not depend on the damping: only queries and scores run
                shutil.copytree(run / "ekfac" / stage, out / stage)
            ekfac(replace(base, run_path=str(out), damping=damping, overwrite=False))
        stores[damping] = str(out / "scores")
    results: dict[str, dict[str, float]] = {f"{d:g}": {} for d in args.dampings}
    names = {None: "lds_spearman", 0.02: "leave_2pct_out_spearman", 0.05: "leave_5pct_out_spearman"}
    for fraction, name in names.items():
        protocol = "lds" if fraction is None else "leave_k_out"
        cfg = ValidateConfig(
            run_path=str(work / f"validate_{tag}{protocol}{fraction or ''}"),
            recipe=str(run / "recipe.yaml"),
            scores=list(stores.values()),
            protocol=protocol,  # type: ignore[arg-type]
            num_subsets=args.subsets,
            seed=0,
            cache_dir=args.cache_dir,
            device="cpu",
        )
        if fraction is not None:
            cfg = replace(cfg, fraction=fraction)
        shutil.rmtree(cfg.run_path, ignore_errors=True)
        validate(cfg)
        measured = json.loads((Path(cfg.run_path) / "validation.json").read_text())["stores"]
        for damping, store in stores.items():
            entry = (
                measured[str(Path(store).resolve())]
                if str(Path(store).resolve()) in measured
                else measured[store]
            )
            results[f"{damping:g}"][name] = round(float(entry["mean_spearman"]), 3)
    print(
        json.dumps(
            {"workload": str(run), "damping_mode": "relative", "default": 0.1, args.ihvp: results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
