"""``bergson report`` and ``bergson serve``: the influential documents as a web page."""

from .build import report
from .serve import serve

__all__ = ["report", "serve"]
