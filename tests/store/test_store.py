"""The on-disk store: round trip, resume after a kill, aggregation, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bergson import BergsonError, IndexConfig, build, collect_gradients, load_gradients
from bergson.config import DataConfig
from bergson.data import load_data, tokenize_documents
from bergson.models import load_model
from bergson.store import writer as writer_mod
from tests.helpers.stores import make_cfg


def reference(cfg: IndexConfig):
    """The same vectors computed in memory, without the store."""
    model, tok = load_model(cfg)
    docs = tokenize_documents(load_data(cfg.data), tok, cfg.data, cfg.token_batch_size)
    sink = collect_gradients(
        model,
        docs,
        projection_dim=cfg.projection_dim,
        token_batch_size=cfg.token_batch_size,
        include_bias=cfg.include_bias,
        progress=False,
    )
    return docs, sink


def test_round_trip(tmp_path, model_dir, corpus_file):
    cfg = make_cfg(tmp_path, model_dir, corpus_file)
    store = build(cfg)
    docs, ref = reference(cfg)
    assert len(store) == len(docs) == 24
    assert store.manifest.status == "complete" and store.manifest.dtype == "float16"
    assert store.manifest.projection == {
        "kind": "gaussian_two_sided",
        "dim": 4,
        "seed": 0,
        "include_bias": False,
    }
    assert isinstance(store[store.modules[0]], np.memmap) or isinstance(
        store[store.modules[0]].base, np.memmap
    )
    np.testing.assert_array_equal(store.rows["row_id"], np.arange(24))
    np.testing.assert_array_equal(store.rows["num_tokens"], docs.lengths)
    np.testing.assert_allclose(store.rows["loss"], ref.loss, rtol=1e-5)
    for name, block in ref.by_module().items():
        got = np.asarray(store[name], np.float64)
        np.testing.assert_allclose(got, block, rtol=2e-3, atol=2e-3 * np.abs(block).max())
    assert (Path(cfg.run_path) / "config.yaml").is_file()
    # a rerun of a complete store is a no-op that returns it
    again = build(cfg)
    assert again.manifest.shards == store.manifest.shards


def test_full_gradients_float32_layout(tmp_path, model_dir, corpus_file):
    cfg = make_cfg(
        tmp_path,
        model_dir,
        corpus_file,
        projection_dim=0,
        include_bias=True,
        data=DataConfig(dataset=str(corpus_file), split="train[:3]", truncation=True),
    )
    store = build(cfg)
    assert store.manifest.dtype == "float32" and len(store) == 3
    _, ref = reference(cfg)
    model, _ = load_model(cfg)
    for m in store.manifest.modules:
        mod = dict(model.named_modules())[m.name]
        expected = mod.weight.numel() + (mod.bias.numel() if m.bias else 0)
        assert m.dim == expected
    np.testing.assert_allclose(np.asarray(store.all), ref.vectors, rtol=1e-5, atol=1e-7)


def _interrupt_after(monkeypatch, n: int) -> None:
    real = writer_mod.StoreWriter.end_shard
    calls = {"n": 0}

    def end_shard(self, index):
        if calls["n"] == n:
            raise KeyboardInterrupt  # what a killed process leaves behind
        calls["n"] += 1
        real(self, index)

    monkeypatch.setattr(writer_mod.StoreWriter, "end_shard", end_shard)


def test_resume_after_kill_is_identical(tmp_path, model_dir, corpus_file, monkeypatch):
    full = build(make_cfg(tmp_path, model_dir, corpus_file, name="full", shard_size=5))
    cfg = make_cfg(tmp_path, model_dir, corpus_file, name="killed", shard_size=5)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            build(cfg)
    shards = sorted(p.name for p in (Path(cfg.run_path) / "shards").glob("*.npy"))
    assert shards == ["00000.npy", "00001.npy"]
    with pytest.raises(BergsonError, match="still being written"):
        load_gradients(cfg.run_path)
    resumed = build(cfg)
    assert len(resumed.manifest.shards) == 5
    for a, b in zip(
        sorted((Path(cfg.run_path) / "shards").iterdir()), sorted((Path(full.root) / "shards").iterdir())
    ):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    np.testing.assert_array_equal(np.asarray(resumed.all), np.asarray(full.all))


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
@pytest.mark.parametrize("unit", [False, True])
def test_aggregation(tmp_path, model_dir, corpus_file, aggregation, unit):
    cfg = make_cfg(
        tmp_path,
        model_dir,
        corpus_file,
        aggregation=aggregation,
        unit_normalize=unit,
        save_dtype="float32",
        shard_size=7,
    )
    store = build(cfg)
    _, ref = reference(cfg)
    rows = ref.vectors
    if unit:
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    expected = rows.mean(0) if aggregation == "mean" else rows.sum(0)
    assert len(store) == 1 and store.manifest.kind == "aggregate"
    np.testing.assert_allclose(
        np.asarray(store.all)[0], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max()
    )
    assert store.rows["num_tokens"][0] == ref.num_tokens.sum()


def test_bad_inputs_are_clear_errors(tmp_path, model_dir, corpus_file):
    with pytest.raises(BergsonError, match="--prompt_column 'body'"):
        build(
            make_cfg(
                tmp_path,
                model_dir,
                corpus_file,
                data=DataConfig(dataset=str(corpus_file), prompt_column="body"),
            )
        )
    with pytest.raises(BergsonError, match="no such file"):
        build(
            make_cfg(tmp_path, model_dir, corpus_file, data=DataConfig(dataset=str(tmp_path / "nope.jsonl")))
        )
    with pytest.raises(BergsonError, match="--truncation"):
        build(
            make_cfg(
                tmp_path,
                model_dir,
                corpus_file,
                data=DataConfig(dataset=str(corpus_file)),
                token_batch_size=16,
            )
        )
    with pytest.raises(BergsonError, match="--model"):
        build(make_cfg(tmp_path, tmp_path / "missing-model", corpus_file))
    assert not (tmp_path / "index").exists()  # nothing was created by failed validation


def test_existing_output_is_never_clobbered(tmp_path, model_dir, corpus_file):
    foreign = tmp_path / "index"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(BergsonError, match="not a bergson store"):
        build(make_cfg(tmp_path, model_dir, corpus_file))
    assert (foreign / "notes.txt").read_text() == "precious"

    store = build(make_cfg(tmp_path, model_dir, corpus_file, name="other"))
    before = {p.name: p.read_bytes() for p in (store.root / "shards").iterdir()}
    with pytest.raises(BergsonError, match=r"projection\.dim: 4 != 8.*--overwrite"):
        build(make_cfg(tmp_path, model_dir, corpus_file, name="other", projection_dim=8))
    assert {p.name: p.read_bytes() for p in (store.root / "shards").iterdir()} == before
    rebuilt = build(
        make_cfg(tmp_path, model_dir, corpus_file, name="other", projection_dim=8, overwrite=True)
    )
    assert rebuilt.manifest.projection["dim"] == 8


def test_corrupt_manifest(tmp_path, model_dir, corpus_file):
    store = build(make_cfg(tmp_path, model_dir, corpus_file))
    (store.root / "manifest.json").write_text("{not json")
    with pytest.raises(BergsonError, match="corrupt"):
        load_gradients(store.root)


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet", "disk"])
def test_dataset_formats_and_slices(tmp_path, model_dir, corpus_file, fmt):
    from datasets import Dataset

    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()][:6]
    ds = Dataset.from_list(rows)
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        ds.to_json(path)
    elif fmt == "csv":
        ds.to_csv(path)
    elif fmt == "parquet":
        ds.to_parquet(path)
    else:
        ds.save_to_disk(path)
    loaded = load_data(DataConfig(dataset=str(path), split="train[2:5]"))
    assert loaded["text"] == [r["text"] for r in rows[2:5]]


def test_empty_and_one_token_documents_are_kept(tmp_path, model_dir):
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["", "In", "In the beginning God created"]))
    store = build(make_cfg(tmp_path, model_dir, path, data=DataConfig(dataset=str(path))))
    assert len(store) == 3
    vecs = np.asarray(store.all, np.float32)
    assert np.all(vecs[0] == 0) and np.all(vecs[1] == 0) and np.any(vecs[2] != 0)
    assert np.isfinite(store.rows["loss"]).all()


def test_completion_column_masks_the_prompt(tmp_path, model_dir):
    path = tmp_path / "pc.jsonl"
    path.write_text(
        json.dumps({"prompt": "In the beginning", "completion": " God created the heaven"}) + "\n"
    )
    cfg = make_cfg(
        tmp_path,
        model_dir,
        path,
        projection_dim=0,
        data=DataConfig(dataset=str(path), prompt_column="prompt", completion_column="completion"),
    )
    store = build(cfg)
    model, tok = load_model(cfg)
    p = tok("In the beginning")["input_ids"]
    c = tok(" God created the heaven", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    labels = ids.clone()
    labels[:, : len(p)] = -100
    from bergson.collect.losses import per_document_loss

    loss = per_document_loss(model(ids).logits, labels)
    assert store.rows["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert store.manifest.loss["kind"] == "completion"
    shutil.rmtree(store.root)


def test_shard_size_does_not_change_rows(tmp_path, model_dir, corpus_file):
    """Rows are in dataset order and hold the same vectors whatever the shard boundaries."""
    one = build(make_cfg(tmp_path, model_dir, corpus_file, name="one", save_dtype="float32"))
    many = build(make_cfg(tmp_path, model_dir, corpus_file, name="many", save_dtype="float32", shard_size=7))
    assert len(many.manifest.shards) == 4 and len(one.manifest.shards) == 1
    np.testing.assert_array_equal(many.rows["row_id"], one.rows["row_id"])
    a, b = np.asarray(one.all), np.asarray(many.all)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    # the multi-shard reader hands out the same module views and row blocks
    name = one.modules[3]
    np.testing.assert_allclose(
        np.asarray(many[name]), np.asarray(one[name]), rtol=1e-4, atol=1e-5 * np.abs(a).max()
    )
    np.testing.assert_allclose(many[name][[0, 8, 23]], np.asarray(many[name])[[0, 8, 23]])
    starts = [s for s, _ in many.blocks(block_rows=5)]
    assert starts == [0, 5, 7, 12, 14, 19, 21]
