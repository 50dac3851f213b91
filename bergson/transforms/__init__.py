"""Transforms applied to per-example gradients: normalizers and random projections."""

from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer
from .projection import projection_matrix

__all__ = ["AdafactorNormalizer", "AdamNormalizer", "Normalizer", "projection_matrix"]
