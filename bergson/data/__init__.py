"""Loading datasets, tokenizing documents and packing them into token-budget batches."""

from .batching import assign_shards, plan_batches, plan_shards
from .load import load_data
from .tokenize import TokenizedDocs, tokenize_documents

__all__ = ["TokenizedDocs", "assign_shards", "load_data", "plan_batches", "plan_shards", "tokenize_documents"]
