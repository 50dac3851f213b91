"""Search a gradient store: exact top-k (streamed in blocks) and FAISS indices.

Scores everywhere are inner products of gradients (cosines with ``unit_norm``):
positive means training on the stored row lowers the query's loss.
Importing this package imports neither torch nor faiss.
"""

from .exact import exact_topk
from .faiss_index import FaissConfig, FaissIndex, faiss_topk, load_or_build_index

__all__ = ["FaissConfig", "FaissIndex", "exact_topk", "faiss_topk", "load_or_build_index"]
