"""Per-example gradient collection: hooks, the math, and the collection loop."""

from .hooks import GradientCollector, module_dims
from .loop import collect_gradients, per_document_loss

__all__ = ["GradientCollector", "collect_gradients", "module_dims", "per_document_loss"]
