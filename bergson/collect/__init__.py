"""Per-example gradient collection: hooks, the math, and the collection loop."""

from ..core.layout import module_dims
from .hooks import GradientCollector
from .loop import collect_gradients
from .losses import per_document_loss

__all__ = ["GradientCollector", "collect_gradients", "module_dims", "per_document_loss"]
