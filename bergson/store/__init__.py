"""The on-disk gradient store: a manifest, completed shards, per-row metadata."""

from .manifest import FORMAT_VERSION, Manifest, ModuleLayout, read_manifest
from .reader import GradientStore, load_gradients
from .verify import VerifyReport, verify_store
from .writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "GradientStore",
    "Manifest",
    "ModuleLayout",
    "StoreWriter",
    "VerifyReport",
    "load_gradients",
    "read_manifest",
    "verify_store",
]
