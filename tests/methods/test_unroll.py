"""``bergson unroll`` against its definition computed densely (float64 toys), and from the shell."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from bergson import BergsonError
from bergson.config import DataConfig, TrainingConfig, UnrollConfig
from bergson.config.options import validate_options
from bergson.methods.magic import unroll as unroll_module
from bergson.methods.magic.recipe import learning_rate
from bergson.methods.magic.replay import Replay, query_gradient, token_losses
from bergson.methods.magic.training_state import optimizer_state_dict
from bergson.transforms.optimizer_state import adam_second_moments
from tests.helpers.assets import tiny_gpt2
from tests.helpers.gradients import random_docs

VOCAB = 12
RECIPE = TrainingConfig(
    optimizer="adamw", lr=0.05, weight_decay=0.1, schedule="cosine", warmup_steps=2, batch_size=2, epochs=2
)


def _trained(tmp_path, tied: bool = False):
    """A float64 GPT-2 trained by the recipe (its final weights in the model), AdamW's state in
    tmp_path/optimizer.pt, the training documents and two queries."""
    model = tiny_gpt2(vocab=VOCAB, hidden=8, layers=1)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    docs = random_docs(8, VOCAB, seed=1, lo=3, hi=7)
    queries = random_docs(2, VOCAB, seed=5, lo=4, hi=7)
    replay = Replay(model, docs, RECIPE, progress=False)
    state, _ = replay.run()
    with torch.no_grad():
        named = dict(model.named_parameters())
        for k, v in state.params.items():
            named[k].copy_(v)
    torch.save(optimizer_state_dict(RECIPE, state, replay.num_steps), tmp_path / "optimizer.pt")
    return model, docs, queries


def _config(tmp_path, **kw):
    return UnrollConfig(model=str(tmp_path), training=RECIPE, **kw)


def _dense_scores(model, docs, queries, cfg):
    """The definition, densely: the Gauss-Newton of the drawn documents from the full Jacobian of
    their loss tokens' logits; each document's summed gradient by its own backward pass; the
    linearised AdamW run written out in the full space and differentiated by autograd in the
    documents' weights. Returns -dQ/dw [documents, queries]."""
    from torch.func import functional_call

    replay = Replay(model, docs, RECIPE, progress=False)
    params = replay.initial_state().params
    keys = list(params)
    sizes = [params[k].numel() for k in keys]
    theta = torch.cat([params[k].reshape(-1) for k in keys]).detach()

    def unflat(x):
        return {k: t.reshape(params[k].shape) for k, t in zip(keys, torch.split(x, sizes))}

    rng = np.random.default_rng(cfg.curvature_seed)
    chosen = np.sort(rng.choice(len(docs), size=min(cfg.curvature_docs, len(docs)), replace=False))
    sample = Replay(
        model, docs.select(chosen.tolist()), TrainingConfig(batch_size=len(chosen), epochs=1), progress=False
    )
    (b,) = sample.micro_batches(0)

    def logits_of(x):
        return functional_call(model, unflat(x), (b.ids,), {"use_cache": False}).logits[b.mask]

    jac = torch.autograd.functional.jacobian(logits_of, theta)  # [n, V, d]
    p = torch.softmax(logits_of(theta), -1).detach()
    hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    gauss_newton = torch.einsum("nvd,nvw,nwe->de", jac, hz, jac) / len(p)

    moments = adam_second_moments(cfg.model, model)
    precondition = torch.cat(
        [1.0 / (moments[k][0].reshape(-1).double().sqrt() + moments[k][1]) for k in keys]
    )
    grads = []
    single = Replay(model, docs, TrainingConfig(batch_size=1, epochs=1), progress=False)
    for s in range(single.num_steps):
        (b,) = single.micro_batches(s)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = (token_losses(model, leaves, b.ids, b.target) * b.mask).sum()
        g = torch.autograd.grad(loss, [leaves[k] for k in keys])
        grads.append((int(single.plan[s][0][0]), torch.cat([x.reshape(-1) for x in g]), float(b.mask.sum())))
    order = sorted(grads, key=lambda x: x[0])
    per_doc = torch.stack([g for _, g, _ in order])
    n_tokens = torch.tensor([n for _, _, n in order], dtype=torch.float64)
    total = replay.num_steps
    out = []
    for j in range(len(queries)):
        q = torch.cat([x.reshape(-1) for x in query_gradient(model, params, queries.select([j])).values()])
        w = torch.ones(len(docs), dtype=torch.float64, requires_grad=True)
        x, m = torch.zeros_like(theta), torch.zeros_like(theta)
        for t in range(total):
            idx = torch.as_tensor(np.concatenate(replay.plan[t]))
            lr = learning_rate(RECIPE, t, total)
            g = (w[idx, None] * per_doc[idx]).sum(0) / (w[idx] * n_tokens[idx]).sum() + gauss_newton @ x
            m = RECIPE.beta1 * m + (1 - RECIPE.beta1) * g
            x = (1 - lr * RECIPE.weight_decay) * x - lr / (1 - RECIPE.beta1 ** (t + 1)) * precondition * m
        (dq,) = torch.autograd.grad(q @ x, w)
        out.append(-dq.numpy())
    return np.stack(out, 1)


def _scores(model, docs, queries, cfg):
    columns = [queries.select([j]) for j in range(len(queries))]
    return unroll_module.unroll_scores(model, docs, columns, cfg, 0, progress=False)[0]


@pytest.mark.parametrize(("tied", "space"), [(False, "per_column"), (True, "per_column"), (False, "shared")])
def test_unroll_equals_the_linearised_run_differentiated_densely(tmp_path, tied, space):
    """With the Krylov space grown until it closes, the scores equal the definition computed in
    the full space to rounding, for an untied and a tied output head and for a space per column or
    shared; with two Lanczos steps they do not (so the curvature term is exercised)."""
    model, docs, queries = _trained(tmp_path, tied)
    cfg = _config(tmp_path, krylov_steps=400, curvature_docs=2, curvature_seed=3, krylov_space=space)
    truth = _dense_scores(model, docs, queries, cfg)
    got = _scores(model, docs, queries, cfg)
    scale = np.abs(truth).max()
    np.testing.assert_allclose(got, truth, atol=1e-7 * scale)
    short = _scores(model, docs, queries, replace(cfg, krylov_steps=2))
    assert np.abs(short - truth).max() > 1e-3 * scale


def test_the_head_products_equal_differentiating_to_the_logits(tmp_path, monkeypatch):
    """The output head written out (the default for a linear head) and the whole model
    differentiated to the logits (any other head) give the same Gauss-Newton products."""
    model, docs, _ = _trained(tmp_path)
    params = Replay(model, docs, RECIPE, progress=False).initial_state().params
    batches = Replay(model, docs.select([0, 1, 2]), TrainingConfig(batch_size=3, epochs=1), progress=False).micro_batches(0)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    vectors = [
        {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()} for _ in range(2)
    ]
    split = unroll_module.gauss_newton_products(model, params, batches, vectors)
    monkeypatch.setattr(unroll_module, "_output_head", lambda m: (None, None, None))
    whole = unroll_module.gauss_newton_products(model, params, batches, vectors)
    for a, b in zip(split, whole):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12)


def test_unroll_refuses_what_it_cannot_model(tmp_path):
    model, docs, queries = _trained(tmp_path)
    with pytest.raises(BergsonError, match=r"--training\.optimizer sgd"):
        _scores(
            model, docs, queries, UnrollConfig(model=str(tmp_path), training=TrainingConfig(optimizer="sgd"))
        )
    (tmp_path / "optimizer.pt").unlink()
    with pytest.raises(BergsonError, match=r"optimizer\.pt"):
        _scores(model, docs, queries, _config(tmp_path))
    with pytest.raises(BergsonError, match="--krylov_steps"):
        validate_options(UnrollConfig(krylov_steps=0))
    with pytest.raises(BergsonError, match="--reward_column"):
        validate_options(UnrollConfig(data=DataConfig(dataset="d.jsonl", reward_column="reward")))


def test_unroll_from_the_shell(tmp_path, model_dir, corpus_file):
    """bergson magic trains and saves RUN/model with optimizer.pt; bergson unroll scores from it,
    writes a scores store whose manifest says what it approximated, and a rerun reuses it. A
    missing optimizer state is a one-line error."""
    data = ["--dataset", str(corpus_file), "--split", "train[:6]", "--truncation", "--max_length", "8"]
    query = ["--query.dataset", str(corpus_file), "--query.split", "train[20:22]", "--query.truncation"]
    query += ["--query.max_length", "8"]
    training = ["--training.lr", "0.01", "--training.batch_size", "2", "--training.epochs", "1"]
    common = [*data, *query, *training, "--precision", "fp32"]
    bergson = [sys.executable, "-m", "bergson"]
    subprocess.run([*bergson, "magic", "--run_path", str(tmp_path / "magic"), "--model", str(model_dir), *common],
                   check=True, capture_output=True)  # fmt: skip
    trained = tmp_path / "magic" / "model"
    args = [*bergson, "unroll", str(tmp_path / "unroll"), "--model", str(trained), *common]
    args += ["--query_mode", "individual", "--krylov_steps", "3", "--curvature_docs", "2"]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    assert "MAGIC" in done.stdout or "positive" in done.stdout
    from bergson.store import load_gradients

    store = load_gradients(tmp_path / "unroll" / "scores")
    scores = np.asarray(store["scores"])
    assert scores.shape == (6, 2) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    manifest = json.loads((tmp_path / "unroll" / "scores" / "manifest.json").read_text())
    assert "unroll" in json.dumps(manifest) and "krylov_steps" in json.dumps(manifest)
    again = subprocess.run(args, check=True, capture_output=True, text=True)
    assert "unroll: documents" not in again.stderr
    np.testing.assert_array_equal(
        np.asarray(load_gradients(tmp_path / "unroll" / "scores")["scores"]), scores
    )
    missing = subprocess.run(
        [*bergson, "unroll", str(tmp_path / "other"), "--model", str(model_dir), *common],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode != 0 and "optimizer" in missing.stderr and "Traceback" not in missing.stderr
