"""Layers called on flattened tokens (batch·seq, in): Qwen2-MoE's shared expert and its gate.

The per-example and per-token vectors of such layers are checked against one backward pass per
document, on a tiny random Qwen2-MoE in float64 with documents of different lengths in a batch.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from bergson import BergsonError
from bergson.collect.engine import PassEngine, token_shape
from bergson.collect.hooks import GradientCollector, LayerTap
from bergson.collect.loop import collect_gradients
from bergson.core.layout import module_shape
from bergson.models import find_tracked_modules
from bergson.transforms.projection import projection_matrix
from tests.helpers.gradients import naive_gradients, random_docs

VOCAB = 40


@pytest.fixture(scope="module")
def qwen_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
        experts_implementation="eager",  # grouped_mm has no float64
    )
    model = Qwen2MoeForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # the router starts at zero: give the routing something to choose
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def docs():
    return random_docs(5, VOCAB, seed=3, lo=3, hi=11)


@pytest.fixture(scope="module")
def truth(qwen_moe, docs):
    return naive_gradients(qwen_moe, docs, find_tracked_modules(qwen_moe), include_bias=False)


def flat_layers(model: nn.Module) -> list[str]:
    return [n for n in find_tracked_modules(model) if ".mlp.shared_expert" in n]


def test_structure_fused_experts_skipped_with_the_warning(qwen_moe, caplog):
    """transformers' Qwen2-MoE: routed experts are 3-D parameters (skipped, with the warning);
    every nn.Linear of the body is tracked, the shared expert's included."""
    with caplog.at_level(logging.WARNING):
        tracked = find_tracked_modules(qwen_moe)
    assert "Qwen2MoeExperts" in caplog.text
    assert all(isinstance(m, nn.Linear) for m in tracked.values())
    assert sorted({n.split(".", 3)[3] for n in flat_layers(qwen_moe)}) == [
        "mlp.shared_expert.down_proj",
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert_gate",
    ]
    assert len(tracked) == 2 * 8  # q, k, v, o and the shared expert's four layers per layer


def test_token_shape():
    ids = torch.zeros(3, 7, dtype=torch.long)
    assert token_shape({"input_ids": ids}) == (3, 7)
    assert token_shape(ids) is None and token_shape({"x": ids}) is None


@pytest.mark.parametrize("per_token", [False, True])
def test_full_gradients_equal_naive_autograd(qwen_moe, docs, truth, per_token):
    """p = 0 keeps G_n exactly, for the 3-D attention layers and the flattened shared expert,
    with padding in every batch (lengths 3..10 packed together)."""
    sink = collect_gradients(
        qwen_moe, docs, projection_dim=0, token_batch_size=40, progress=False, per_token=per_token
    )
    by_module = sink.by_module()
    assert set(flat_layers(qwen_moe)) <= set(by_module)
    for name, rows in by_module.items():
        want = np.stack([w.flatten().numpy() for w, _ in truth[name]])
        np.testing.assert_allclose(rows, want, rtol=1e-9, atol=1e-12, err_msg=name)
    if per_token:
        for row, n in enumerate(sink.num_tokens):
            toks = sink.tokens[row]
            assert toks is not None and toks.shape[0] == n
            np.testing.assert_allclose(toks.sum(0), sink.vectors[row], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per_token", [False, True])
def test_projected_gradients_equal_naive_autograd(qwen_moe, docs, truth, per_token):
    """p > 0: vec(L G_n Rᵀ) with the library's seeded matrices, G_n from one backward per document."""
    p = 4
    sink = collect_gradients(
        qwen_moe, docs, projection_dim=p, token_batch_size=40, progress=False, per_token=per_token
    )
    modules = find_tracked_modules(qwen_moe)
    for name, rows in sink.by_module().items():
        out, n_in = module_shape(modules[name])
        left = projection_matrix(0, name, "left", p, out, dtype=torch.float64)
        right = projection_matrix(0, name, "right", p, n_in, dtype=torch.float64)
        want = np.stack([(left @ w @ right.T).flatten().numpy() for w, _ in truth[name]])
        np.testing.assert_allclose(rows, want, rtol=1e-8, atol=1e-12, err_msg=name)
    if per_token:
        for row in range(len(docs)):
            np.testing.assert_allclose(sink.tokens[row].sum(0), sink.vectors[row], rtol=1e-9, atol=1e-12)
            # padding positions carry no vector; each real position has its own term
            assert sink.tokens[row].shape[0] == docs.lengths[row]


def test_layer_tap_sees_documents(qwen_moe, docs):
    """The statistics hooks get x [B, T, in] and g [B, T, out] for flattened layers too, and
    Σ_t g_t x_tᵀ per document is the document's gradient."""
    from bergson.collect.losses import document_batches, lm_loss

    name = next(n for n in flat_layers(qwen_moe) if n.endswith("down_proj"))
    seen: list[torch.Tensor] = []

    def fn(_: str, x: torch.Tensor, g: torch.Tensor) -> None:
        assert x.ndim == 3 and x.shape[:2] == g.shape[:2]
        seen.append(torch.einsum("bto,bti->boi", g, x))

    idx = np.arange(len(docs))
    batches = list(document_batches(docs, [idx], 0, torch.device("cpu")))
    PassEngine(qwen_moe, lm_loss(docs, "sum"), progress=False).run(
        batches, hooks=LayerTap({name: qwen_moe.get_submodule(name)}, fn)
    )
    (got,) = seen
    ref = naive_gradients(qwen_moe, docs, {name: qwen_moe.get_submodule(name)}, False)[name]
    for n, (w, _) in enumerate(ref):
        torch.testing.assert_close(got[n], w, rtol=1e-9, atol=1e-12)


class Gathered(nn.Module):
    """A toy 'routed expert': a linear layer that sees only some of the batch's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.expert = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        flat = h.reshape(-1, 6)
        picked = flat[::3]
        flat = flat.index_add(0, torch.arange(0, flat.shape[0], 3), self.expert(picked))
        return self.head(flat.reshape(h.shape))


def test_gathered_tokens_are_refused_by_name():
    model = Gathered().double()
    collector = GradientCollector(model, ["expert"], projection_dim=2)
    batch = {"input_ids": torch.randint(0, 10, (2, 4))}

    def loss_fn(m: nn.Module, b: dict) -> torch.Tensor:
        return m(b["input_ids"]).sum((1, 2))

    with pytest.raises(BergsonError, match=r"'expert'.*gathered subset of tokens cannot be"):
        PassEngine(model, loss_fn, progress=False).run([batch], hooks=collector)


def test_model_configuration_reports_on_qwen_moe(qwen_moe):
    """``test_model_configuration`` on a model with a flattened shared expert reports (consistent)
    instead of crashing."""
    import copy

    from bergson import ModelConfigTestConfig, load_model
    from bergson.diagnostics import test_model_configuration
    from tests.helpers.assets import ASSETS

    def loader(opts):
        _, tokenizer = load_model(opts)
        model = copy.deepcopy(qwen_moe).float()
        model.resize_token_embeddings(len(tokenizer))
        return model, tokenizer

    cfg = ModelConfigTestConfig(
        model=str(ASSETS / "tiny-pythia"), device="cpu", precision="fp32", num_documents=3, projection_dim=4
    )
    report = test_model_configuration(cfg, loader=loader)
    assert report["consistent_as_configured"] is True, report
    first = report["settings"][0]
    assert first["status"] == "tested" and first["padded_max_rel_error"] < 1e-4


def test_cli_build_on_qwen_moe(qwen_moe, tmp_path, corpus_file):
    """``bergson build`` on a saved Qwen2-MoE (8 documents a batch): every row gets the vector of its
    document alone (one a batch)."""
    import copy

    from transformers import AutoTokenizer

    from bergson import load_gradients
    from bergson.cli import main
    from tests.helpers.assets import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia")
    model = copy.deepcopy(qwen_moe).float()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    stores = {}
    for budget in (128, 16):  # 8 documents of 16 tokens per batch, then one per batch
        run = tmp_path / f"run{budget}"
        args = ["build", str(run), "--model", str(tmp_path / "moe"), "--dataset", str(corpus_file)]
        args += [
            "--data.truncation",
            "--data.max_length",
            "16",
            "--projection_dim",
            "4",
            "--precision",
            "fp32",
        ]
        main([*args, "--token_batch_size", str(budget)])
        stores[budget] = load_gradients(run)
    store = stores[128]
    assert any(".mlp.shared_expert_gate" in n for n in store.modules)
    assert (np.asarray(store.rows["num_tokens"]) == 16).all()
    batched, alone = (np.asarray(stores[b].all, np.float64) for b in (128, 16))
    assert np.abs(batched).min(1).max() > 0
    np.testing.assert_allclose(batched, alone, rtol=1e-3, atol=1e-3 * np.abs(alone).max())


def test_collector_outside_the_engine_reads_the_models_input(qwen_moe, docs, truth):
    """A trainer's own step (no pass engine): the model's ``input_ids`` give the batch shape."""
    from bergson.collect.losses import document_batches, per_document_loss

    names = flat_layers(qwen_moe)
    (batch,) = document_batches(docs, [np.arange(len(docs))], 0, torch.device("cpu"))
    qwen_moe.requires_grad_(False)
    try:
        with GradientCollector(qwen_moe, names, projection_dim=0) as collector:
            logits = qwen_moe(input_ids=batch.ids, attention_mask=batch.mask.long()).logits
            per_document_loss(logits, batch.labels).sum().backward()
    finally:
        qwen_moe.requires_grad_(True)
    for name in names:
        want = torch.stack([w.flatten() for w, _ in truth[name]])
        torch.testing.assert_close(collector.gradients[name], want, rtol=1e-9, atol=1e-12)
