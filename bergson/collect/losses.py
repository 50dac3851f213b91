"""The losses the pass engine differentiates, and the batches of documents they read.

* :func:`per_document_loss`: the next-token cross-entropy of each document (sum or mean
  over its loss tokens; prompt, chat and padding positions carry the ignore index).
* :func:`targets` with :func:`document_seed`: the next-token labels of a Fisher, either the
  dataset's tokens (empirical) or tokens sampled from the model's own predictions (true),
  seeded per document so that they do not depend on batching or the number of workers.
* :func:`lm_loss`: the loss of ``bergson build`` / ``score``: the per-document loss times the
  document's weight (a GRPO advantage), when the documents carry weights.
* :func:`fisher_loss`: the loss of EK-FAC's passes under a Fisher's labels.
* :func:`idle_loss`: the throwaway loss of an idle step of a sharded model.

Padding and the ignore index live with batching (:mod:`bergson.data.batching`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import IGNORE, pad_batch
from ..data.tokenize import TokenizedDocs
from ..errors import BergsonError
from .head_loss import Sampler, document_losses, reduce_documents

REDUCTIONS = ("sum", "mean")


@dataclass
class DocumentBatch:
    """Right-padded documents of one step: dataset ``rows`` (indices into the documents), input
    ``ids`` and ``labels`` [B, T] (the ignore index where there is no loss), and each row's
    length [B]."""

    rows: np.ndarray
    ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    _mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        """The real (unpadded) tokens of the batch."""
        return int(self.lengths.sum())

    @property
    def mask(self) -> torch.Tensor:
        """[B, T]: True at the real tokens, False at the padding."""
        if self._mask is None:
            positions = torch.arange(self.ids.shape[1], device=self.ids.device)
            self._mask = positions[None] < self.lengths[:, None]
        return self._mask


def document_batches(
    docs: TokenizedDocs, plan: Iterable[np.ndarray], pad_token_id: int, device: torch.device
) -> Iterator[DocumentBatch]:
    """The batches of ``plan`` (arrays of row indices into ``docs``), padded and on ``device``."""
    for idx in plan:
        ids, labels = pad_batch(docs, idx, pad_token_id)
        lengths = torch.as_tensor(docs.lengths[idx], device=device)
        yield DocumentBatch(idx, ids.to(device), labels.to(device), lengths)


def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the inputs -> the target of each position (the next token's label)."""
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    return target


def token_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position [B, T] (0 where the target is the ignore index);
    half-precision logits are upcast to float32 first."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(target.shape)


def per_document_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Next-token cross-entropy per document, [B]; labels equal to -100 carry no loss.

    ``labels`` are aligned with the inputs (the shift happens here), as in Hugging Face
    models. ``reduction`` is 'sum' over the document's loss tokens or their 'mean'.
    """
    if reduction not in REDUCTIONS:
        raise BergsonError(f"loss reduction {reduction!r}: choose sum or mean")
    # Shift the labels rather than the logits: slicing [B, T, V] logits would copy them
    # forward and fill a zero tensor of the same size in the reverse pass.
    target = next_tokens(labels)
    return _reduce(token_losses(logits, target), target, reduction)


def _reduce(token: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    return reduce_documents(token.sum(1), target, reduction)


def document_loss(
    model: nn.Module, batch: DocumentBatch, target: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Each document's next-token loss under ``target`` [B, T], [B]: through the fused output
    head when the model allows it (:mod:`bergson.collect.head_loss`), from the logits otherwise."""
    return document_losses(
        model,
        batch.ids,
        target,
        reduction,
        lambda logits: _reduce(token_losses(logits, target), target, reduction),
    )


def document_seed(seed: int, row: int) -> int:
    """The label-sampling seed of one document: independent of batching and worker count."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:8], "little") >> 1


def label_sampler(rows: np.ndarray, seed: int) -> Sampler:
    """``sample(b, logits)``: batch row b's true-Fisher targets, drawn from the softmax of its
    float logits [n, V] with a generator seeded per document (:func:`document_seed`)."""

    def sample(b: int, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, -1).cpu()
        gen = torch.Generator().manual_seed(document_seed(seed, int(rows[b])))
        return torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)

    return sample


def targets(
    logits: torch.Tensor, labels: torch.Tensor, rows: np.ndarray, fisher: str, seed: int
) -> torch.Tensor:
    """Next-token targets aligned with ``logits`` ([B, T]; -100 where there is no loss).

    ``fisher='empirical'`` uses the dataset's tokens; ``'true'`` samples each target from
    the model's own prediction with a generator seeded per document (:func:`label_sampler`).
    """
    target = next_tokens(labels)
    if fisher == "empirical":
        return target
    _check_fisher(fisher)
    sample = label_sampler(rows, seed)
    with torch.no_grad():
        for b in range(len(rows)):
            pos = (target[b] != IGNORE).nonzero().squeeze(1)
            if len(pos):
                target[b, pos] = sample(b, logits[b, pos].float())
    return target


def _check_fisher(fisher: str) -> None:
    if fisher not in ("true", "empirical"):
        raise BergsonError(f"--fisher {fisher!r}: choose true or empirical")


def lm_loss(
    docs: TokenizedDocs, reduction: str = "sum"
) -> Callable[[nn.Module, DocumentBatch], torch.Tensor]:
    """``loss(model, batch)`` -> [B]: each document's next-token loss (``reduction`` over its loss
    tokens), times its weight when ``docs`` carry weights (GRPO advantages)."""
    if reduction not in REDUCTIONS:
        raise BergsonError(f"loss reduction {reduction!r}: choose sum or mean")
    weights = docs.weights

    def loss(model: nn.Module, batch: DocumentBatch) -> torch.Tensor:
        losses = document_loss(model, batch, next_tokens(batch.labels), reduction)
        if weights is not None:
            losses = losses * torch.as_tensor(weights[batch.rows], dtype=losses.dtype, device=losses.device)
        return losses

    return loss


def fisher_loss(fisher: str, seed: int) -> Callable[[nn.Module, DocumentBatch], torch.Tensor]:
    """``loss(model, batch)`` -> [B]: each document's summed next-token loss under the labels of
    ``fisher`` ('true': sampled from the model, seeded per document; 'empirical': the dataset's)."""
    _check_fisher(fisher)

    def loss(model: nn.Module, batch: DocumentBatch) -> torch.Tensor:
        def from_logits(logits: torch.Tensor) -> torch.Tensor:
            return token_losses(logits, targets(logits, batch.labels, batch.rows, fisher, seed)).sum(1)

        sample = label_sampler(batch.rows, seed) if fisher == "true" else None
        return document_losses(model, batch.ids, next_tokens(batch.labels), "sum", from_logits, sample)

    return loss


def idle_loss(pad_token_id: int) -> Callable[[nn.Module], torch.Tensor]:
    """The loss of an idle step: one padding token through the model, times zero."""

    def loss(model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        ids = torch.full((1, 1), pad_token_id, dtype=torch.long, device=device)
        return model(input_ids=ids, use_cache=False).logits.float().sum() * 0.0

    return loss
