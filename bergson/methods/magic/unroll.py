"""``bergson unroll``: MAGIC's reverse pass through training, approximated at the final state.

MAGIC differentiates the query loss exactly through every training step, which costs a reverse
pass through the whole run per score column. The benchmark that motivated this method
(``benchmarks.quality.first_order``) found that nearly all of MAGIC's agreement with retraining
survives when every step's curvature is the exact Gauss-Newton at the *final* weights and AdamW is
differentiated at its *final* state: what the run contributes is only its batch order and
learning rates. This module makes that cheap:

* **One linearised run.** The Gauss-Newton H of the mean token loss over ``--curvature_docs``
  training documents at the final weights stands for every step's; AdamW is linearised at its
  final state (``P = 1 / (sqrt(v_hat_T) + eps)`` frozen; momentum, the first moment's bias
  correction, decoupled weight decay and the learning-rate schedule kept; the second moment's
  dependence on the gradient dropped). In the coordinates ``P^(-1/2) theta`` every operator of
  that run is a scalar or ``A = P^(1/2) H P^(1/2)``, so the query's cotangent at every step is a
  polynomial in A applied to ``b = P^(1/2) grad Q``.
* **A Krylov subspace per column.** ``--krylov_steps`` Lanczos steps from b (one Gauss-Newton
  product each) give an orthonormal basis V and ``T = V^T A V``; the adjoint recursion then runs
  through all T training steps in k dimensions (:func:`adjoint_scores`). With
  ``--krylov_space shared`` one space is grown from every column's b at once
  (:func:`block_lanczos`) and each column's recursion runs in it.
* **One pass over the documents.** A document's contribution at a step needs only
  ``V^T P^(1/2) G_i``, the projection of its summed loss gradient at the final weights: one
  per-document gradient each (:func:`document_projections`).

A document's score is ``-dQ/dw_i`` summed over the steps that train on it, with the training
step's token-mean convention (``d g_t / d w_k = (grad l_k - g_t) / W_t``): positive means that
up-weighting the document lowers the query loss after training, as MAGIC's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...config.options import ModelOptions
from ...config.unroll import UnrollConfig, check_adamw
from ...errors import BergsonError
from ...models import honours_numerics
from .recipe import learning_rate
from .replay import MicroBatch, Replay, math_attention, query_gradient

logger = logging.getLogger(__name__)

CONFIG_FILE = "unroll.yaml"
Vectors = list[torch.Tensor]
DOCUMENT_BATCH = 16  # documents whose gradients are taken at once (torch.func.vmap)


def _output_head(model: nn.Module) -> tuple[nn.Linear | None, str | None, str | None]:
    """The model's output head when it is a plain linear layer, with its weight's and bias's
    parameter names (None where absent)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        return None, None, None
    names = {id(p): n for n, p in model.named_parameters()}
    bias = names.get(id(head.bias)) if head.bias is not None else None
    return head, names.get(id(head.weight)), bias


def gauss_newton_products(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    batches: list[MicroBatch],
    vectors: list[dict[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """The exact Gauss-Newton of the mean token loss over ``batches`` at ``params`` times each
    vector: ``J^T H_z J v / W``, with J the logits' Jacobian, ``H_z = diag(p) - p p^T`` the softmax
    cross-entropy's Hessian in the logits at each loss token and W the loss tokens.

    The body is differentiated by the double-VJP trick (``J v`` as the derivative of ``J^T u . v``
    in u, then one VJP back). When the logits are the output head's linear map of its input h
    (checked on each batch), the trick stops at h and the head's products are written out on the
    loss tokens alone (``J v = [J_h v, h] [W, V_W]^T``; back, ``H_z J v`` times W and h): the
    vocabulary-wide work is then three matrix products and three elementwise passes per vector."""
    from torch.func import functional_call

    tokens = sum(float(b.mask.sum()) for b in batches)
    keys = list(params)
    head, weight_name, bias_name = _output_head(model)
    out = [{k: torch.zeros_like(v) for k, v in params.items()} for _ in vectors]
    for b in batches:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        seen: dict[str, torch.Tensor] = {}
        hook = None
        if head is not None:
            hook = head.register_forward_hook(lambda _m, inp, _o, got=seen: got.__setitem__("h", inp[0]))
        try:
            with torch.enable_grad(), math_attention():
                logits = functional_call(model, leaves, (b.ids,), {"use_cache": False}).logits
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        finally:
            if hook is not None:
                hook.remove()
        rows = b.mask
        h = seen.get("h")
        weight = bias = None
        if head is not None and h is not None:
            weight = leaves.get(weight_name or "", head.weight).detach().to(logits.dtype)
            bias = None if head.bias is None else leaves.get(bias_name or "", head.bias)
            first = h[0].detach().to(logits.dtype) @ weight.T + (
                0 if bias is None else bias.detach().to(logits.dtype)
            )
            if not torch.allclose(first, logits[0].detach(), rtol=1e-4, atol=1e-4 * float(first.abs().max())):
                h = None  # the logits are not the head's linear map (scaled, capped): differentiate to them
        with torch.enable_grad(), math_attention():
            target = logits if h is None else h
            u = torch.zeros_like(target, requires_grad=True)
            jt_u = torch.autograd.grad(
                target, [leaves[k] for k in keys], u, create_graph=True, allow_unused=True
            )
            probs = torch.softmax(logits.detach()[rows], -1)  # [n, V]: the loss tokens'
            hs = None if h is None else h.detach().to(logits.dtype)[rows]
            for j, v in enumerate(vectors):
                terms = [(x * v[k]).sum() for x, k in zip(jt_u, keys) if x is not None]
                if terms:
                    ju = torch.autograd.grad(torch.stack(terms).sum(), u, retain_graph=True)[0].to(
                        logits.dtype
                    )[rows]
                else:
                    ju = torch.zeros_like(target, dtype=logits.dtype)[rows]
                if hs is not None and weight is not None:
                    left, right = ju, weight
                    if weight_name in v:
                        left, right = (
                            torch.cat([ju, hs], 1),
                            torch.cat([weight, v[weight_name].to(logits.dtype)], 1),
                        )
                    ju = left @ right.T
                    if bias_name in v:
                        ju = ju + v[bias_name].to(logits.dtype)
                pj = probs * ju
                hz = torch.addcmul(pj, probs, pj.sum(-1, keepdim=True), value=-1.0)  # H_z J v
                cot = torch.zeros_like(target)
                if hs is not None and weight is not None:
                    if weight_name in out[j]:
                        out[j][weight_name] += (hz.T @ (hs / tokens)).to(out[j][weight_name].dtype)
                    if bias_name in out[j]:
                        out[j][bias_name] += (hz.sum(0) / tokens).to(out[j][bias_name].dtype)
                    cot[rows] = ((hz @ weight) / tokens).to(cot.dtype)
                else:
                    cot[rows] = (hz / tokens).to(cot.dtype)
                got = torch.autograd.grad(
                    target, [leaves[k] for k in keys], cot, retain_graph=True, allow_unused=True
                )
                for k, x in zip(keys, got):
                    if x is not None:
                        out[j][k] += x
    return out


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``w`` less its component in the span of the orthonormal rows of ``basis`` (classical
    Gram-Schmidt twice, which keeps a fully reorthogonalised basis orthonormal)."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos(
    matvec: Callable[[Vectors], Vectors], starts: Vectors, steps: int
) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
    """``steps`` Lanczos iterations of the symmetric operator ``matvec`` (flat vectors in and out,
    one call for all starts) from each of ``starts``, fully reorthogonalised: per start its basis
    V [k, d], ``T = V A V^T`` [k, k] (tridiagonal) and the start's coordinates in V (its norm times
    e_1). A start whose Krylov space closes early (an invariant subspace, where the recursion is
    exact) keeps the smaller basis."""
    bases = [[s / s.norm()] for s in starts]
    alphas: list[list[float]] = [[] for _ in starts]
    betas: list[list[float]] = [[] for _ in starts]
    live = [j for j, s in enumerate(starts) if float(s.norm()) > 0]
    for it in range(steps):
        if not live:
            break
        products = matvec([bases[j][-1] for j in live])
        still = []
        for j, w in zip(live, products):
            basis = torch.stack(bases[j])
            alphas[j].append(float(bases[j][-1] @ w))
            w = _orthogonalise(w, basis)
            beta = float(w.norm())
            if it == steps - 1 or beta <= 1e-7 * max(abs(a) for a in alphas[j]):
                continue
            betas[j].append(beta)
            bases[j].append(w / beta)
            still.append(j)
        live = still
    out = []
    for j, s in enumerate(starts):
        k = max(len(alphas[j]), 1)
        tri = np.zeros((k, k))
        tri[: len(alphas[j]), : len(alphas[j])] = np.diag(alphas[j])
        for i, beta in enumerate(betas[j][: k - 1]):
            tri[i, i + 1] = tri[i + 1, i] = beta
        start = np.zeros(k)
        start[0] = float(s.norm())
        out.append((torch.stack(bases[j][:k]), tri, start))
    return out


def block_lanczos(
    matvec: Callable[[Vectors], Vectors], starts: Vectors, steps: int
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """One Krylov space shared by every start: ``steps`` block steps from the span of ``starts``
    (one product per basis vector, as many per step as starts), fully reorthogonalised. Returns
    the basis V [K, d], ``T = V A V^T`` [K, K] and each start's coordinates in V [starts, K]."""
    block = list(starts)
    basis = torch.zeros((0, block[0].shape[0]), dtype=block[0].dtype, device=block[0].device)
    products: list[torch.Tensor] = []
    for _ in range(steps):
        added = []
        for w in block:  # one at a time, so a dependent vector is dropped and nothing else
            size = float(w.norm())
            w = _orthogonalise(w, basis)
            if float(w.norm()) > 1e-7 * size:
                added.append(w / w.norm())
                basis = torch.cat([basis, added[-1][None]])
        if not added:  # the space closed: the recursion in it is exact
            break
        block = matvec(added)
        products += block
    coords = (torch.stack(starts) @ basis.T).double().cpu().numpy()
    if not products:  # every query gradient is zero: so is every score
        return basis, np.zeros((0, 0)), coords
    t = (basis @ torch.stack(products).T).double().cpu().numpy()
    return basis, (t + t.T) / 2, coords


def adjoint_scores(
    tridiagonal: np.ndarray,
    start: np.ndarray,
    projections: np.ndarray,
    loss_tokens: np.ndarray,
    plan: list[np.ndarray],
    lrs: list[float],
    beta1: float,
    weight_decay: float,
) -> np.ndarray:
    """``-dQ/dw_i`` per document through the linearised AdamW run, in Krylov coordinates.

    ``projections`` [N, k]: each document's ``V^T P^(1/2) G_i``; ``plan[t]`` the documents of step
    t and ``lrs[t]`` its learning rate. The cotangents of the weights (``lam``) and of the first
    moment (``mu``) run backwards from the query's, ``P^(1/2) grad Q = V start``:

        theta_{t+1} = (1 - lr_t wd) theta_t - lr_t / (1 - beta1^(t+1)) P m_t
        m_t = beta1 m_{t-1} + (1 - beta1) g_t,    g_t = g_t(w) + H theta_t
    """
    k = tridiagonal.shape[0]
    lam = np.asarray(start, dtype=np.float64).copy()
    mu = np.zeros(k)
    scores = np.zeros(projections.shape[0])
    for t in reversed(range(len(plan))):
        lr = lrs[t]
        mu = beta1 * mu - (lr / (1 - beta1 ** (t + 1))) * lam
        c = (1 - beta1) * mu  # dQ/dg_t
        lam = (1 - lr * weight_decay) * lam + tridiagonal @ c
        docs = plan[t]
        tokens = float(loss_tokens[docs].sum())
        dots = projections[docs] @ c
        offset = dots.sum() / tokens  # c . g_t
        scores[docs] -= (dots - loss_tokens[docs] * offset) / tokens
    return scores


def document_projections(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    replay: Replay,
    directions: torch.Tensor,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Each document's summed loss gradient at ``params`` (flattened in ``params``' order) times
    ``directions`` [R, d]: [N, R], with each document's loss-token count [N]. ``replay`` plans one
    epoch of micro-batches; their documents' gradients are taken at once (``torch.func.vmap``)."""
    from torch.func import functional_call, grad, vmap
    from tqdm import tqdm

    from ...collect.losses import token_losses as position_losses

    keys = list(params)
    n = len(replay.docs)
    proj = np.zeros((n, directions.shape[0]))
    tokens = np.zeros(n)

    def loss_of(
        p: dict[str, torch.Tensor], ids: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(model, p, (ids[None],), {"use_cache": False}).logits
        return (position_losses(logits, target[None]) * mask[None]).sum()

    per_document = vmap(grad(loss_of), in_dims=(None, 0, 0, 0))
    detached = {k: v.detach() for k, v in params.items()}
    bar = tqdm(total=n, desc="unroll: documents", unit="doc", disable=not progress)
    for s in range(replay.num_steps):
        for idx, b in zip(replay.plan[s], replay.micro_batches(s)):
            with math_attention():
                g = per_document(detached, b.ids, b.target, b.mask)
            flat = torch.cat([g[k].reshape(len(idx), -1) for k in keys], 1)
            proj[idx] = (flat.detach() @ directions.T).double().cpu().numpy()
            tokens[idx] = b.mask.sum(1).double().cpu().numpy()
            bar.update(len(idx))
    bar.close()
    return proj, tokens


def adam_root_preconditioner(path: Path, model: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``P^(1/2) = (sqrt(v_hat) + eps)^(-1/2)``, flattened in ``params``' order, from AdamW's state
    after the last step (every trained parameter must have one)."""
    from ...transforms.optimizer_state import adam_second_moments

    moments = adam_second_moments(path, model)
    parts = []
    for key, p in params.items():
        if key not in moments:
            raise BergsonError(
                f"--optimizer_state {path}: no state for the trained parameter {key} (check --training.freeze "
                "against the run that trained --model)"
            )
        v_hat, eps = moments[key]
        v_hat = v_hat.reshape(-1).to(p.device)
        parts.append((1.0 / (v_hat.sqrt() + eps)).sqrt())
    return torch.cat(parts)


def unroll_scores(
    model: nn.Module, docs: Any, queries: list[Any], cfg: UnrollConfig, pad: int, progress: bool = True
) -> tuple[np.ndarray, dict[str, float]]:
    """Scores [N, columns] of ``docs`` for each query set in ``queries`` (its mean loss), with the
    seconds of each stage. ``model`` holds the final weights."""
    training = cfg.training
    check_adamw(training)
    if training.max_grad_norm > 0:
        logger.warning(
            "unroll: --training.max_grad_norm %g: gradient clipping is not modelled (its rescaling is "
            "taken as 1 at every step)",
            training.max_grad_norm,
        )
    seconds: dict[str, float] = {}
    replay = Replay(model, docs, training, pad, progress=False)  # the run's batch order
    params = replay.initial_state().params  # the model's own: the final weights
    keys = list(params)
    shapes = [(k, params[k].shape, params[k].numel()) for k in keys]
    root = adam_root_preconditioner(cfg.optimizer_state_file(), model, params)

    def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[k].reshape(-1) for k in keys])

    def unflat(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, shape, n in shapes:
            out[k] = x[i : i + n].reshape(shape)
            i += n
        return out

    start = time.perf_counter()
    starts = [root * flat(query_gradient(model, params, q, pad)) for q in queries]
    rng = np.random.default_rng(cfg.curvature_seed)
    chosen = np.sort(rng.choice(len(docs), size=min(cfg.curvature_docs, len(docs)), replace=False))
    sample = Replay(model, docs.select(chosen.tolist()), replace(training, batch_size=len(chosen), epochs=1), pad, progress=False)  # fmt: skip
    batches = sample.micro_batches(0)

    def matvec(vectors: Vectors) -> Vectors:
        got = gauss_newton_products(model, params, batches, [unflat(root * v) for v in vectors])
        return [root * flat(g) for g in got]

    with torch.no_grad():
        if cfg.krylov_space == "shared":
            basis, tri, coords = block_lanczos(matvec, starts, cfg.krylov_steps)
            spaces, columns_of = [(basis, tri)], [(0, c) for c in coords]
        else:
            found = lanczos(matvec, starts, cfg.krylov_steps)
            spaces, columns_of = [(b, t) for b, t, _ in found], [(j, c) for j, (_, _, c) in enumerate(found)]
    seconds["curvature_s"] = time.perf_counter() - start
    start = time.perf_counter()
    one_epoch = replace(training, batch_size=DOCUMENT_BATCH, grad_accumulation=1, epochs=1)
    epoch = Replay(model, docs, one_epoch, pad, progress=False)
    directions = torch.cat([b for b, _ in spaces]) * root
    proj, loss_tokens = document_projections(model, params, epoch, directions, progress)
    seconds["documents_s"] = time.perf_counter() - start
    start = time.perf_counter()
    total = replay.num_steps
    plan = [np.concatenate(replay.plan[t]) for t in range(total)]
    lrs = [learning_rate(training, t, total) for t in range(total)]
    offsets = np.cumsum([0, *(len(b) for b, _ in spaces)])
    columns = []
    for space, coords in columns_of:
        tri = spaces[space][1]
        cols = proj[:, offsets[space] : offsets[space + 1]]
        columns.append(
            adjoint_scores(tri, coords, cols, loss_tokens, plan, lrs, training.beta1, training.weight_decay)
        )
    seconds["recursion_s"] = time.perf_counter() - start
    return np.stack(columns, axis=1), seconds


@honours_numerics
def unroll(cfg: UnrollConfig) -> Any:
    """Score the training documents of ``cfg`` (see the module's docstring); returns the scores store."""
    from ...config import IndexConfig, MagicConfig
    from ...config.options import validate_options
    from ...runs.manifests import make_manifest
    from ...runs.rundir import RunDir
    from ...store import load_gradients
    from ...store.scores import save_score_matrix
    from .command import prepare, query_columns

    validate_options(cfg)
    if not cfg.model:
        raise BergsonError("--model is required: the trained model (its final weights, with optimizer.pt)")
    if not cfg.data.dataset:
        raise BergsonError("--dataset is required: the training documents")
    if not cfg.query.dataset:
        raise BergsonError("--query.dataset is required: the documents whose loss is attributed")
    run_dir = RunDir(cfg, command="unroll", what="an unroll run", config_file=CONFIG_FILE, outputs=("scores",),
                     ignore=("top_k", "device")).prepare()  # fmt: skip
    root = run_dir.root
    if (root / "scores").is_dir():
        return load_gradients(root / "scores")
    model_options = {f.name: getattr(cfg, f.name) for f in fields(ModelOptions)}
    recipe = MagicConfig(**model_options, data=cfg.data, query=cfg.query, training=cfg.training,
                         query_mode=cfg.query_mode)  # fmt: skip
    model, tokenizer, docs, qdocs = prepare(recipe)
    pad = tokenizer.pad_token_id or 0
    columns = query_columns(recipe, len(qdocs))
    start = time.perf_counter()
    scores, seconds = unroll_scores(model, docs, [qdocs.select(c.tolist()) for c in columns], cfg, pad)
    run_dir.timings.record("scores_s", start, **seconds)
    base = make_manifest(
        IndexConfig(model=cfg.model, revision=cfg.revision, data=cfg.data, projection_dim=0),
        model, {}, docs, int(docs.lengths.max()),
    )  # fmt: skip
    info = {
        "kind": "unroll",
        "mode": cfg.query_mode,
        "query_dataset": cfg.query.dataset,
        "krylov_steps": cfg.krylov_steps,
        "krylov_space": cfg.krylov_space,
        "curvature_docs": min(cfg.curvature_docs, len(docs)),
        "curvature_seed": cfg.curvature_seed,
        "optimizer_state": str(cfg.optimizer_state_file()),
        "training": dict(vars(cfg.training)),
        "approximations": "final weights and AdamW state at every step; one Gauss-Newton of "
        "--curvature_docs documents; the second moment's derivative dropped; gradient clipping not modelled",
        "unit_normalize": False,
        "meaning": "-d(mean query loss after training)/d(document weight)",
    }
    save_score_matrix(root / "scores", scores, base, info, overwrite=True)
    return load_gradients(root / "scores")
