"""``bergson preconditioner RUN_PATH (--model M --dataset D | --index STORE | --mix_train A --mix_query B)``"""

from __future__ import annotations

from ..config import PreconditionerConfig
from ..distributed import reports

CONFIG = PreconditionerConfig


def run(cfg: PreconditionerConfig) -> None:
    from ..preconditioning import fit_preconditioner

    pre = fit_preconditioner(cfg)
    if not reports():
        return
    print(f"wrote {cfg.run_path}: {len(pre.modules)} modules, second moments of {pre.num_rows} rows")
    if pre.mixing:
        weights = list(pre.mixing["weights"].values())
        print(f"mixing weights of the query moment: {min(weights):.4g} to {max(weights):.4g}")
