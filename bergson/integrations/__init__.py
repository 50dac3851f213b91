"""Integrations with training frameworks: the Hugging Face ``Trainer`` callback."""

from .trainer import GradientCollectorCallback, prepare_for_gradient_collection

__all__ = ["GradientCollectorCallback", "prepare_for_gradient_collection"]
