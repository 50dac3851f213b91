"""Per-token vectors and scores: each position's term g_t x_tᵀ, summing to the document (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bergson import IndexConfig, ScoreConfig, build, collect_gradients, score
from bergson.collect.losses import per_document_loss
from bergson.core.layout import module_shape
from bergson.data.batching import pad_batch
from bergson.errors import BergsonError
from bergson.models import find_tracked_modules
from bergson.transforms.projection import projection_matrix
from tests.helpers.assets import tiny_neox
from tests.helpers.gradients import dense_second_moments, random_docs

MODULES = ["gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.1.mlp.dense_4h_to_h"]


def position_terms(model, module, docs, i: int) -> torch.Tensor:
    """∂loss/∂Δ_t for a perturbation Δ_t of the layer's weight applied at position t only:
    [T, out, in]. This is the t-th term of the document's gradient, from autograd alone."""
    out, n_in = module_shape(module)
    ids, labels = pad_batch(docs, np.array([i]), 0)
    delta = torch.zeros(ids.shape[1], out, n_in, dtype=torch.float64, requires_grad=True)

    def hook(_mod, inputs, output):
        return output + torch.einsum("toi,ti->to", delta, inputs[0][0])[None]

    handle = module.register_forward_hook(hook)
    try:
        loss = per_document_loss(model(ids).logits, labels).sum()
        (grad,) = torch.autograd.grad(loss, delta)
    finally:
        handle.remove()
    return grad


@pytest.mark.parametrize("norm", [None, "adafactor"])
@pytest.mark.parametrize("p", [0, 4])
def test_token_vectors_against_autograd(p, norm):
    model = tiny_neox()
    modules = find_tracked_modules(model, MODULES)
    docs = random_docs(4, model.config.vocab_size, seed=3)
    docs.loss_start[1] = 4  # a prompt: its positions still carry terms through attention
    ada, _ = dense_second_moments(modules, include_bias=False)
    normalizers = ada if norm else None
    kwargs = dict(modules=modules, projection_dim=p, seed=2, normalizers=normalizers, progress=False)
    sink = collect_gradients(model, docs, per_token=True, token_batch_size=30, **kwargs)
    whole = collect_gradients(model, docs, **kwargs)
    np.testing.assert_allclose(sink.vectors, whole.vectors, rtol=1e-10, atol=1e-14)
    offsets = np.cumsum([0, *sink.dims.values()])
    for i in range(len(docs)):
        tokens = sink.tokens[i]
        assert tokens is not None and tokens.shape == (len(docs.input_ids[i]), sink.vectors.shape[1])
        np.testing.assert_allclose(tokens.sum(0), sink.vectors[i], rtol=1e-10, atol=1e-14)
        for k, (name, m) in enumerate(modules.items()):
            terms = position_terms(model, m, docs, i)
            if norm:
                terms = terms / ada[name].dense().sqrt()
            if p:
                left = projection_matrix(2, name, "left", p, terms.shape[1], dtype=torch.float64)
                right = projection_matrix(2, name, "right", p, terms.shape[2], dtype=torch.float64)
                terms = left @ terms @ right.T
            expected = terms.reshape(len(terms), -1).numpy()
            got = tokens[:, offsets[k] : offsets[k + 1]]
            np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())


@pytest.fixture(scope="module")
def token_store(tmp_path_factory, model_dir, corpus_file):
    root = tmp_path_factory.mktemp("tokens")
    common = dict(
        model=str(model_dir), precision="fp32", device="cpu", projection_dim=4, save_dtype="float32"
    )
    data = dict(dataset=str(corpus_file), truncation=True, max_length=40)
    from bergson.config import DataConfig

    store = build(
        IndexConfig(
            run_path=str(root / "docs"), data=DataConfig(**data), per_token=True, shard_size=7, **common
        )
    )  # type: ignore[arg-type]
    query = build(
        IndexConfig(run_path=str(root / "q"), data=DataConfig(**data, split="train[:3]"), **common)  # type: ignore[arg-type]
    )
    return root, store, query, common, data


def test_store_token_rows_sum_to_documents_across_shards(token_store):
    _, store, _, _, _ = token_store
    assert store.has_tokens and len(store.manifest.shards) == 4  # 24 rows in shards of 7
    for i in range(len(store)):
        tokens = store.token_rows(i)
        assert len(tokens) == store.rows["num_tokens"][i] > 0
        np.testing.assert_allclose(
            tokens.sum(0), store.all[i], rtol=1e-4, atol=1e-6 * np.abs(store.all[i]).max()
        )


@pytest.mark.parametrize("mode", ["individual", "mean", "max"])
def test_score_token_rows(token_store, mode):
    """Per-token scores sum to the document scores and equal the token rows of a per-token
    build dotted with the query vectors."""
    root, store, query, common, data = token_store
    from bergson.config import DataConfig

    out = score(
        ScoreConfig(run_path=str(root / f"s_{mode}"), data=DataConfig(**data), query_path=str(query.root),
                    score=mode, per_token=True, **common)  # type: ignore[arg-type]
    )  # fmt: skip
    q = np.asarray(query.all, np.float64)
    for i in range(len(out)):
        tokens = out.token_rows(i)
        np.testing.assert_allclose(tokens.sum(0), out["scores"][i], rtol=1e-4, atol=1e-6)
        raw = np.asarray(store.token_rows(i), np.float64) @ q.T  # [T, nq]
        doc = np.asarray(store.all[i], np.float64) @ q.T
        expected = {"individual": raw, "mean": raw.mean(1, keepdims=True), "max": raw[:, [doc.argmax()]]}[
            mode
        ]
        np.testing.assert_allclose(tokens, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def test_per_token_errors(token_store, tmp_path):
    _, _, _, common, data = token_store
    from bergson.config import DataConfig

    with pytest.raises(BergsonError, match="--per_token with --aggregation"):
        build(
            IndexConfig(
                run_path=str(tmp_path / "a"),
                data=DataConfig(**data),
                per_token=True,
                aggregation="mean",
                **common,
            )
        )  # type: ignore[arg-type]
    plain = build(
        IndexConfig(run_path=str(tmp_path / "b"), data=DataConfig(**data, split="train[:2]"), **common)
    )  # type: ignore[arg-type]
    with pytest.raises(BergsonError, match="--per_token"):
        plain.token_rows(0)
    # a per-token build cannot resume into a store built without token rows
    with pytest.raises(BergsonError, match="per_token"):
        build(
            IndexConfig(
                run_path=str(tmp_path / "b"),
                data=DataConfig(**data, split="train[:2]"),
                per_token=True,
                **common,
            )
        )  # type: ignore[arg-type]


@pytest.mark.parametrize("unit_norm", [False, True])
def test_query_splits_each_hit_over_training_and_query_tokens(token_store, unit_norm, tmp_path):
    from bergson import QueryConfig
    from bergson.querying import query

    _, store, _, common, _ = token_store
    out = tmp_path / "hits.csv"
    cfg = QueryConfig(
        index=str(store.root), model=common["model"], precision="fp32", device="cpu",
        query="The river flows through the old town", top_k=3, unit_normalize=unit_norm, per_token=True,
        output=str(out),
    )  # fmt: skip
    hits = query(cfg)
    assert len(hits) == 3
    for h in hits:
        doc = np.array([t["score"] for t in h["tokens"]])
        q = np.array([t["score"] for t in h["query_tokens"]])
        assert len(doc) == store.rows["num_tokens"][h["row_id"]]
        np.testing.assert_allclose(doc.sum(), h["score"], rtol=1e-3, atol=1e-6 * np.abs(doc).sum())
        np.testing.assert_allclose(q.sum(), h["score"], rtol=1e-3, atol=1e-6 * np.abs(q).sum())
        assert all(t["token"] for t in h["tokens"])  # decoded from the store's dataset
        assert "".join(t["token"] for t in h["query_tokens"]) == cfg.query
    import json

    import pyarrow.csv as pacsv

    table = pacsv.read_csv(out)
    assert json.loads(table["tokens"][0].as_py())[0]["position"] == 0


def test_query_per_token_from_the_shell(token_store):
    from tests.helpers.cli import run

    _, store, _, common, _ = token_store
    proc = run("query", "--index", str(store.root), "--model", common["model"], "--precision", "fp32",
               "--device", "cpu", "--query", "A history of music", "--top_k", "2", "--per_token")  # fmt: skip
    assert proc.stdout.count("training tokens:") == 2 and proc.stdout.count("query tokens:") == 2


def test_score_of_an_existing_store_keeps_its_token_rows(token_store, tmp_path):
    """score --index --per_token reads the store's token rows: the same scores as scoring the
    dataset; without token rows in the store it is an error, and without --per_token none are kept."""
    from bergson.config import DataConfig

    root, store, query, common, data = token_store
    direct = score(
        ScoreConfig(run_path=str(root / "s_individual_ref"), data=DataConfig(**data), query_path=str(query.root),
                    per_token=True, **common)  # type: ignore[arg-type]
    )  # fmt: skip
    indexed = score(
        ScoreConfig(run_path=str(tmp_path / "s"), index=str(store.root), query_path=str(query.root), per_token=True,
                    **common)  # type: ignore[arg-type]
    )  # fmt: skip
    np.testing.assert_allclose(indexed["scores"], direct["scores"], rtol=1e-4, atol=1e-6)
    for i in range(len(store)):
        np.testing.assert_allclose(indexed.token_rows(i), direct.token_rows(i), rtol=1e-3, atol=1e-5)
    plain = score(
        ScoreConfig(run_path=str(tmp_path / "p"), index=str(store.root), query_path=str(query.root), **common)  # type: ignore[arg-type]
    )
    assert not plain.has_tokens
    with pytest.raises(BergsonError, match="has no token rows"):
        score(
            ScoreConfig(run_path=str(tmp_path / "q"), index=str(query.root), query_path=str(query.root),
                        per_token=True, **common)  # type: ignore[arg-type]
        )  # fmt: skip


def test_reduce_of_a_per_token_store(token_store, tmp_path):
    from bergson import ReduceConfig, reduce

    _, store, _, common, _ = token_store
    out = reduce(ReduceConfig(run_path=str(tmp_path / "r"), index=str(store.root), **common))  # type: ignore[arg-type]
    assert not out.has_tokens and len(out) == 1
    np.testing.assert_allclose(out.all[0], np.asarray(store.all, np.float64).mean(0), rtol=1e-4, atol=1e-7)
    with pytest.raises(BergsonError, match="no tokens to break down"):
        reduce(ReduceConfig(run_path=str(tmp_path / "s"), index=str(store.root), per_token=True, **common))  # type: ignore[arg-type]
