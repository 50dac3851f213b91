"""The loss scale c of a Trainer micro-batch, measured from the gradient that reaches the logits.

A trainer's loss is some multiple c of each row's summed next-token cross-entropy S (a mean
over the accumulated batch's tokens, divided by the accumulation steps, scaled by a loss
scaler, ...). For S, dS/dz = softmax(z) - onehot(y) at label positions, so the gradient G that
actually reaches the logits z gives c = <G, dS/dz> / |dS/dz|^2 per row, here taken at a few
label positions of each row, which also check that G is a multiple of dS/dz at all.
:meth:`MicroBatch.unscaled` divides the hooked vectors by c.

A model that returns per-token log-probabilities of its labels instead of logits (TRL's fused
LM head, which never calls the output layer and computes them from its weight in chunks)
gives c more directly: S = -sum_t log p_t, so the gradient reaching each label's
log-probability is -c (:meth:`MicroBatch.fused_forward`, :meth:`MicroBatch.fused_backward`);
that it is the same at every label position of a row is the check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batching import IGNORE
from .checks import callback_error

logger = logging.getLogger(__name__)

PROBES = 3
"""Label positions per row at which the loss scale c is measured and checked."""


def _probe_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _probe_positions(mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] label positions per row, evenly spread over its labels (first and last included);
    rows without labels get position 0 (unused)."""
    n = mask.sum(1)
    j = torch.arange(k, device=mask.device)
    rank = (j[None, :] * (n[:, None] - 1).clamp(min=0)) // max(k - 1, 1)
    count = mask.long().cumsum(1) - 1
    hit = (count[:, None, :] == rank[:, :, None]) & mask[:, None, :]
    return hit.int().argmax(-1)


@dataclass
class MicroBatch:
    """One micro-batch between its forward pass and the end of its backward pass.

    The probes touch the [B, T, V] logits and their gradient G only through gathers (no pass
    over the vocabulary, which would cost as much as the model's own loss). Per-row losses come
    from G too: with G = c (softmax(z) - onehot(y)), 1 - p_y = -G_y / c and p_v = G_v / c for
    v != y, so a token's cross-entropy is -log1p(G_y / c) when p_y >= 1/2 (accurate as p_y -> 1)
    and otherwise z_v - z_y - log(G_v / c) with v another token (the position's input token),
    whose probability keeps full relative precision unless c p_v underflows; only then the
    less accurate -log(1 + G_y / c) is used. float16 logits, whose gradients underflow easily,
    get an exact cross-entropy pass in the forward instead.
    """

    rows: np.ndarray
    step: int
    index: int
    normalized: bool
    buffer: torch.Tensor
    """[B, total_dim]: the hooked (c-scaled) vectors, filled by the collector's closure."""
    targets: torch.Tensor
    num_tokens: np.ndarray
    inputs: torch.Tensor | None = None
    has_targets: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    """[B] summed next-token cross-entropy of each row."""
    probes: torch.Tensor | None = None
    """[B * k] flat (row * T + position) indices of the probe positions."""
    dloss: torch.Tensor | None = None
    """[B, k, V] dS/dz at the probe positions."""
    other: torch.Tensor | None = None
    """[B * T] a token other than the target at every position."""
    logit_gap: torch.Tensor | None = None
    """[B * T] z_other - z_y."""
    scale: torch.Tensor | None = None
    """[B] c: the trainer's gradient per unit of the row's summed cross-entropy."""
    residual: torch.Tensor | None = None
    grad_dtype: torch.dtype | None = None
    forward_done: bool = False
    filled: set[str] = field(default_factory=set)
    """Column blocks whose vectors the collector's closure has written."""
    approximate: int = 0
    """Loss tokens whose cross-entropy could only be approximated (c p_v underflowed)."""

    def probe_forward(self, logits: torch.Tensor) -> None:
        """dS/dz at a few label positions per row, and what the losses need from the logits."""
        if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(self.targets.shape):
            raise callback_error(
                f"the model's logits have shape {tuple(logits.shape)} but its labels "
                f"{tuple(self.targets.shape)}; it needs one label per input position (a causal LM)"
            )
        with torch.no_grad():
            batch, length, vocab = logits.shape
            flat = logits.detach().reshape(batch * length, vocab)
            targets = self.targets.to(flat.device)
            mask = targets != IGNORE
            safe = targets.clamp(min=0).reshape(-1)
            pos = _probe_positions(mask, PROBES)
            k = pos.shape[1]
            self.probes = (torch.arange(batch, device=flat.device)[:, None] * length + pos).reshape(-1)
            d = torch.softmax(flat.index_select(0, self.probes).to(_probe_dtype(flat)), dim=-1)
            d[torch.arange(batch * k, device=flat.device), safe[self.probes]] -= 1.0
            self.dloss = d.view(batch, k, vocab)
            self.has_targets = mask.any(1)
            if flat.dtype == torch.float16:
                ce = F.cross_entropy(flat.float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
                self.loss = ce.view(batch, length).sum(1).double()
            else:
                nxt = (safe + 1) % vocab
                if self.inputs is not None and self.inputs.shape == self.targets.shape:
                    inputs = self.inputs.to(flat.device).reshape(-1)
                    self.other = torch.where((inputs != safe) & (inputs >= 0) & (inputs < vocab), inputs, nxt)
                else:
                    self.other = nxt
                gap = flat.gather(1, self.other[:, None]).double() - flat.gather(1, safe[:, None]).double()
                self.logit_gap = gap.squeeze(1)
            self.forward_done = True

    def fused_forward(self, log_probs: torch.Tensor, label_mask: torch.Tensor) -> None:
        """The rows' losses from a fused LM head's [B, T-1] label log-probabilities, which must
        score exactly the labels the batch carries (``label_mask``)."""
        targets = self.targets[:, :-1].to(label_mask.device)
        if tuple(log_probs.shape) != tuple(targets.shape) or not torch.equal(label_mask, targets != IGNORE):
            raise callback_error(
                f"the model's fused LM head scored labels of shape {tuple(log_probs.shape)} that are not the "
                f"batch's next-token labels {tuple(targets.shape)}; pass per-position labels (no shift_labels)"
            )
        with torch.no_grad():
            mask = label_mask.to(torch.float64)
            self.has_targets = label_mask.any(1)
            self.loss = -(log_probs.detach().double() * mask).sum(1)
            self.forward_done = True

    def fused_backward(self, label_mask: torch.Tensor, grad: torch.Tensor) -> None:
        """c per row from the gradient reaching the label log-probabilities (-c at each one)."""
        assert self.has_targets is not None
        with torch.no_grad():
            mask = label_mask.to(torch.float64)
            g = grad.double() * mask
            count = mask.sum(1)
            scale = torch.where(self.has_targets, -g.sum(1) / count.clamp(min=1), torch.zeros_like(count))
            spread = ((g + scale[:, None]) * mask).abs().amax(1)
            valid = self.has_targets & (scale != 0)
            self.scale = scale
            self.residual = torch.where(
                valid, spread / scale.abs().clamp(min=1e-300), torch.zeros_like(spread)
            )
            self.grad_dtype = grad.dtype

    def probe_backward(self, grad: torch.Tensor) -> None:
        """c per row from the gradient reaching the logits, how far the gradient is from a multiple
        of dS/dz, and (unless done in the forward) the per-row losses."""
        assert self.probes is not None and self.dloss is not None and self.has_targets is not None
        with torch.no_grad():
            batch, length, vocab = grad.shape
            flat = grad.reshape(batch * length, vocab)
            d = self.dloss.flatten(1)
            g = flat.index_select(0, self.probes).to(d.dtype).view_as(d)
            num = torch.linalg.vecdot(g, d).double()
            den = torch.linalg.vecdot(d, d).double()
            valid = self.has_targets & (den > 0)
            scale = torch.where(valid, num / den.clamp(min=1e-300), torch.zeros_like(num))
            norm = g.norm(dim=1).double()
            resid = (g - scale.to(d.dtype)[:, None] * d).norm(dim=1).double() / norm.clamp(min=1e-300)
            self.scale = scale
            self.residual = torch.where(valid & (norm > 0), resid, torch.zeros_like(resid))
            self.grad_dtype = grad.dtype
            self.dloss = None
            if self.loss is None:
                assert self.other is not None and self.logit_gap is not None
                targets = self.targets.to(flat.device).reshape(-1)
                safe = targets.clamp(min=0)
                c = torch.where(valid, scale, torch.ones_like(scale)).repeat_interleave(length)
                g_other = flat.gather(1, self.other[:, None]).squeeze(1)
                rest = (-flat.gather(1, safe[:, None]).squeeze(1).double() / c).clamp(0.0, 1.0)  # 1 - p_y
                precise = g_other.abs() >= torch.finfo(g_other.dtype).tiny * 2**10
                nll = torch.where(
                    rest <= 0.5,
                    -torch.log1p(-rest),
                    torch.where(
                        precise,
                        self.logit_gap - (g_other.double() / c).clamp(min=1e-300).log(),
                        -(1.0 - rest).clamp(min=1e-300).log(),
                    ),
                )
                keep = (targets != IGNORE) & valid.repeat_interleave(length)
                self.approximate = int((keep & (rest > 0.5) & ~precise).sum())
                self.loss = torch.where(keep, nll, torch.zeros_like(nll)).view(batch, length).sum(1)
                self.other = self.logit_gap = None

    def unscaled(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows' vectors divided by c (float64) and their summed cross-entropies (float32).

        Rows without labels or without weight in the trainer's loss get a zero vector and loss 0;
        rows with non-finite gradients (a loss-scaler overflow, a step the trainer skips) get a NaN
        vector, which the store writer stores as zeros and lists in the manifest. Raises
        when the gradient reaching the logits is not a multiple of dS/dz."""
        if not self.forward_done or self.has_targets is None:
            raise callback_error(
                "the model's output layer did not run in the forward pass and the model returned no per-token "
                "log-probabilities of its labels (a fused LM head), so the loss scale cannot be measured; "
                "get_output_embeddings() must return the layer that computes the logits"
            )
        if self.scale is None or self.residual is None:
            if bool(self.has_targets.any()):
                raise callback_error(
                    "no gradient reached the model's logits (or label log-probabilities) in this micro-batch (the loss does not come from "
                    "the logits, or backward did not run)"
                )
            scale = torch.zeros(len(self.rows), dtype=torch.float64, device=self.buffer.device)
            residual = torch.zeros_like(scale)
        else:
            scale, residual = self.scale, self.residual
        tol = 1e-3 if self.grad_dtype in (None, torch.float32, torch.float64) else 3e-2
        worst = int(residual.argmax())
        if float(residual[worst]) > tol:
            raise callback_error(
                f"the gradient reaching the logits of dataset row {int(self.rows[worst])} is not a multiple of "
                f"its summed next-token cross-entropy (relative difference {float(residual[worst]):.2g}): the "
                "trainer's loss has other terms (label smoothing, a z-loss, per-token weights such as TRL's DFT loss, a custom "
                "compute_loss) or the model rescales its output layer's logits; only the plain causal-LM loss "
                "of the labels is supported"
            )
        finite = torch.isfinite(scale) & torch.isfinite(self.buffer).all(1)
        usable = self.has_targets & (scale != 0) & finite
        if bool((self.has_targets & ~finite).any()):
            logger.warning(
                "step %d: non-finite gradients (a loss-scaler overflow; the trainer skips this step); rows %s "
                "are stored as zeros and listed in the epoch store's manifest (nonfinite)",
                self.step,
                self.rows[(self.has_targets & ~finite).cpu().numpy()].tolist(),
            )
        elif bool((self.has_targets & (scale == 0)).any()):
            logger.warning(
                "step %d: some rows have labels but no weight in the trainer's loss; zero vectors", self.step
            )
        safe = torch.where(usable, scale, torch.ones_like(scale))
        vectors = torch.where(
            usable[:, None], self.buffer.double() / safe[:, None], torch.zeros((), dtype=torch.float64)
        )
        vectors[self.has_targets & ~finite] = float("nan")  # the writer zeroes and records them
        loss = torch.zeros_like(scale) if self.loss is None else self.loss.to(scale.device)
        loss = torch.where(usable, loss, torch.zeros_like(loss))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "step %d micro-batch %d: rows %s, loss scale %s",
                self.step,
                self.index,
                self.rows.tolist(),
                scale.tolist(),
            )
        return vectors.cpu().numpy(), loss.float().cpu().numpy()
