"""``bergson query --index STORE [--query TEXT | --query_dataset D] [--top_k 10]``"""

from __future__ import annotations

from ..config import QueryConfig

CONFIG = QueryConfig


def run(cfg: QueryConfig) -> None:
    from ..querying import query

    query(cfg)
