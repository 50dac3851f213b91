"""Ground truth for gradients: random documents, one backward pass per document, dense second
moments, and the explicit second moments of a store's rows."""

from __future__ import annotations

import numpy as np
import torch

from bergson import AdafactorNormalizer, AdamNormalizer
from bergson.collect.losses import per_document_loss
from bergson.core.experts import ExpertLinear
from bergson.core.layout import module_shape
from bergson.data import TokenizedDocs


def random_docs(n: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 12) -> TokenizedDocs:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, rng.integers(lo, hi)) for _ in range(n)]
    return TokenizedDocs(ids, np.zeros(n, np.int64))


def naive_gradients(model, docs: TokenizedDocs, modules: dict, include_bias: bool) -> dict[str, list]:
    """One backward pass per document; returns (weight grad in (out, in), bias grad) per module."""
    out: dict[str, list] = {n: [] for n in modules}
    for seq, start in zip(docs.input_ids, docs.loss_start):
        model.zero_grad()
        ids = torch.as_tensor(seq)[None]
        labels = ids.clone()
        labels[:, :start] = -100
        per_document_loss(model(ids).logits, labels).sum().backward()
        for name, m in modules.items():
            if isinstance(m, ExpertLinear):  # one expert's (or a router's) slice of a fused parameter
                grad = m.source.grad
                w = (
                    torch.zeros(m.weight.shape, dtype=m.weight.dtype)
                    if grad is None
                    else m.grad_of(grad).clone()
                )
                assert not (include_bias and m.bias is not None), "expert biases: not in this reference"
                out[name].append((w, None))
                continue
            w = m.weight.grad.detach().clone()
            if type(m).__name__ == "Conv1D":
                w = w.T
            b = m.bias.grad.detach().clone() if include_bias and m.bias is not None else None
            out[name].append((w, b))
    return out


def dense_second_moments(modules: dict, include_bias: bool, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ada, adam = {}, {}
    for name, m in modules.items():
        out, n_in = module_shape(m)
        v = torch.rand(out, n_in, generator=gen, dtype=torch.float64) + 0.1
        vb = torch.rand(out, generator=gen, dtype=torch.float64) + 0.1
        adam[name] = AdamNormalizer(v, vb if include_bias else None, eps=0.0)
        row = torch.rand(out, generator=gen, dtype=torch.float64) + 0.1
        col = torch.rand(n_in, generator=gen, dtype=torch.float64) + 0.1
        ada[name] = AdafactorNormalizer(row, col, torch.tensor(0.7, dtype=torch.float64), eps=0.0)
    return ada, adam


def explicit_moments(store) -> dict[str, np.ndarray]:
    """(1/N) VᵀV per module over the rows that are not all zero."""
    out = {}
    v = np.asarray(store.all, np.float64)
    v = v[np.abs(v).max(1) > 0]
    for m in store.manifest.modules:
        block = v[:, m.offset : m.offset + m.dim]
        out[m.name] = block.T @ block / len(block)
    return out


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)
