"""Search a gradient store: exact top-k (streamed) and FAISS indices."""

from .exact import exact_topk

__all__ = ["exact_topk"]
