"""``bergson score RUN_PATH --model M --dataset D --query_path QUERY_STORE [--score individual|mean|max]``

With ``--candidates EARLIER --top_k K --method ekfac|kfac|trackstar`` (and that method's options,
``bergson score --candidates X --method M --help`` lists them): the retrieve-then-rescore cascade
(:mod:`bergson.methods.cascade`), which rescores only each query's K best rows of EARLIER.
"""

from __future__ import annotations

from typing import Any

from ..config import ScoreConfig
from ..config.cascade import CascadeEkfacConfig, CascadeTrackstarConfig, cascade_config_class
from . import print_top_rows, report_store

CONFIG = ScoreConfig

SHOWN = 10
"""Rows a cascade prints per query (its --top_k counts the candidates)."""


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == f"--{name}":
            return args[i + 1] if i + 1 < len(args) else ""
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def config_for(args: list[str], values: dict[str, Any]) -> type:
    """ScoreConfig, or with --candidates (a flag or a YAML key) the cascade's config of --method."""
    if _flag(args, "candidates") is None and not values.get("candidates"):
        return ScoreConfig
    method = _flag(args, "method") or values.get("method") or "ekfac"
    return cascade_config_class(str(method))


def run(cfg: Any) -> None:
    if isinstance(cfg, (CascadeEkfacConfig, CascadeTrackstarConfig)):
        from ..methods.cascade import cascade

        store = cascade(cfg)
        if report_store(store, store.manifest.score["orientation"]):
            done = store.manifest.score["cascade"]
            print(
                f"cascade: rescored {done['rescored_rows']} of {done['rows']} rows "
                f"({100 * done['rescored_rows'] / max(done['rows'], 1):.1f}%) with {done['method']}: the union of "
                f"each query's top {done['top_k']} in {done['candidates']}; the other rows hold "
                f"{done['unscored_value']:.7g} (not scored)"
            )
            print_top_rows(store, min(cfg.top_k, SHOWN, done["rescored_rows"]), "query")
        return
    from ..scoring import score

    store = score(cfg)  # None on a rank that wrote a node-local copy (report_store prints nothing there)
    orientation = store.manifest.score["orientation"] if store is not None and store.manifest.score else ""
    report_store(store, orientation, cfg.top_k)
