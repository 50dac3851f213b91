"""``bergson serve --index STORE [--model M] [--host 127.0.0.1] [--port 8000]``"""

from __future__ import annotations

from ..config import ServeConfig

CONFIG = ServeConfig


def run(cfg: ServeConfig) -> None:
    from ..reports import serve

    serve(cfg)
