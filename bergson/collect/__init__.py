"""Per-example gradient collection: hooks and their math, the losses, the one pass engine and
the document collection loop on it."""

from ..core.layout import module_dims
from .engine import PassEngine
from .hooks import GradientCollector
from .loop import collect_gradients
from .losses import per_document_loss

__all__ = ["GradientCollector", "PassEngine", "collect_gradients", "module_dims", "per_document_loss"]
