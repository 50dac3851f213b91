"""The on-disk gradient store: a manifest, completed shards, per-row metadata."""

from .manifest import FORMAT_VERSION, Manifest, ModuleLayout, read_manifest
from .reader import GradientStore, load_gradients
from .writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "GradientStore",
    "Manifest",
    "ModuleLayout",
    "StoreWriter",
    "load_gradients",
    "read_manifest",
]
