"""Stores written in the original package's format (tests/helpers/legacy_store.py): read in place
(rows, metadata, the dataset view, search, score, reduce, report) and converted once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bergson import Attributor, BergsonError, build, exact_topk, load_gradients
from bergson.cli import main
from bergson.config import DataConfig
from bergson.methods.compat import convert_store
from bergson.models import load_model
from tests.helpers.legacy_store import LEGACY_MODEL, legacy_store_of_model, write_legacy_part
from tests.helpers.stores import make_cfg

SIZES = {"layers.0.attention.dense": 3, "layers.0.mlp.dense_4h_to_h": 4}


@pytest.fixture
def two_parts(tmp_path) -> tuple[Path, np.ndarray]:
    """A store of the original built in two parts: an older one with a structured dtype, a newer
    one with base_dtype."""
    grads = np.random.default_rng(0).standard_normal((7, 7)).astype(np.float16)
    root = tmp_path / "old"
    texts = [f"text {i}" for i in range(7)]
    write_legacy_part(root / "part-0", grads[:4], SIZES, texts[:4], structured=True, losses=np.arange(4.0))
    write_legacy_part(
        root / "part-1", grads[4:], SIZES, texts[4:], lengths=[9, 8, 7], losses=np.arange(4.0, 7.0)
    )
    return root, grads


def test_read_in_place_rows_metadata_and_dataset_view(two_parts):
    root, grads = two_parts
    store = load_gradients(root)
    assert store.is_legacy and len(store) == 7 and store.modules == list(SIZES)
    assert store.manifest.model["name"] == LEGACY_MODEL and store.manifest.dtype == "float16"
    assert isinstance(store._parts[0], np.memmap)  # mapped, not read
    np.testing.assert_array_equal(np.asarray(store.all), grads)
    np.testing.assert_array_equal(np.asarray(store["layers.0.mlp.dense_4h_to_h"]), grads[:, 3:])
    np.testing.assert_array_equal(store.rows["row_id"], np.arange(7))
    np.testing.assert_array_equal(store.rows["num_tokens"], [3, 4, 5, 6, 9, 8, 7])
    np.testing.assert_array_equal(store.rows["loss"], np.arange(7.0))
    view = store.to_dataset()
    assert {"text", "input_ids", "length", "loss", "row_id", "gradients"} <= set(view.column_names)
    assert view["text"] == [f"text {i}" for i in range(7)]
    np.testing.assert_array_equal(
        np.asarray(view.with_format("numpy")["gradients"]), grads.astype(np.float32)
    )
    assert store.manifest.preconditioner is None
    # built with the original's hessian_path and unit normalization: the vectors carry H^-1/2
    config = root / "part-0" / "config.yaml"
    run = yaml.safe_load(config.read_text())
    run["steps"][0]["build"]["preprocess_cfg"] = {"unit_normalize": True, "hessian_path": "h"}
    config.write_text(yaml.safe_dump(run))
    carried = load_gradients(root).manifest
    assert carried.preconditioner == {"kind": "original", "path": "h", "power": -0.5}
    assert carried.unit_normalize


def test_search_score_reduce_and_report_in_place(two_parts, tmp_path, capsys):
    root, grads = two_parts
    query = write_legacy_part(tmp_path / "q", grads[[5, 1]], SIZES, ["q5", "q1"])
    g = grads.astype(np.float64)
    scores, idx = exact_topk(load_gradients(root), g[[5, 1]], 2)
    assert idx[:, 0].tolist() == [5, 1]
    np.testing.assert_allclose(scores[:, 0], (g[[5, 1]] ** 2).sum(1), rtol=1e-6)

    main(["score", str(tmp_path / "scores"), "--index", str(root), "--query_path", str(query)])
    got = np.asarray(load_gradients(tmp_path / "scores")["scores"], np.float64)
    np.testing.assert_allclose(got, g @ g[[5, 1]].T, rtol=2e-3, atol=1e-3)
    # one part: its data.hf (texts included) is the store's dataset, so the report shows the texts
    main(["score", str(tmp_path / "scores1"), "--index", str(root / "part-1"), "--query_path", str(query)])
    main(["report", str(tmp_path / "scores1"), "--output", str(tmp_path / "r.html"), "--top_k", "2"])
    assert "text 5" in (tmp_path / "r.html").read_text()

    main(["reduce", str(tmp_path / "mean"), "--index", str(root), "--aggregation", "mean"])
    np.testing.assert_allclose(
        np.asarray(load_gradients(tmp_path / "mean").all)[0], g.mean(0), rtol=2e-3, atol=1e-3
    )


def test_bfloat16_is_converted_exactly_and_bad_stores_are_refused(tmp_path, capsys):
    values = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    write_legacy_part(tmp_path / "bf", values, SIZES, list("abcde"), dtype="bfloat16")
    with pytest.raises(BergsonError, match="bergson convert"):
        load_gradients(tmp_path / "bf")
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "bf"), str(tmp_path / "new"), "--model", "none-such-model"])
    assert "--model none-such-model: cannot read its configuration" in capsys.readouterr().err
    main(
        ["convert", str(tmp_path / "bf"), str(tmp_path / "new")]
    )  # its config's model is unavailable: warned
    assert "wrote GradientStore" in capsys.readouterr().out
    new = load_gradients(tmp_path / "new")
    assert new.manifest.dtype == "float32" and not new.is_legacy
    bits = values.view(np.uint32) & np.uint32(0xFFFF0000)  # bfloat16 is float32's top half
    np.testing.assert_array_equal(np.asarray(new.all), bits.view(np.float32))
    np.testing.assert_array_equal(new.rows["loss"], np.linspace(1, 2, 5).astype(np.float32))

    info = json.loads((tmp_path / "bf" / "info.json").read_text())
    (tmp_path / "bf" / "info.json").write_text(json.dumps({**info, "num_grads": 6}))
    with pytest.raises(BergsonError, match="truncated"):
        load_gradients(tmp_path / "bf")
    (tmp_path / "bf" / "info.json").write_text(
        json.dumps({**info, "attribute_tokens": True, "base_dtype": "float16"})
    )
    (tmp_path / "bf" / "gradients.bin").write_bytes(np.zeros((5, 7), np.float16).tobytes())
    with pytest.raises(BergsonError, match="per-token"):
        load_gradients(tmp_path / "bf")
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "nothing"), str(tmp_path / "new2")])
    assert "no info.json and gradients.bin" in capsys.readouterr().err


def test_converted_store_is_searched_by_traced_queries(tmp_path, model_dir, corpus_file):
    """A full-gradient store of the original (our own gradients written in its format, module
    names relative to base_model) converted once: traced queries find the same rows with the
    same scores as in the store it came from."""
    data = DataConfig(dataset=str(corpus_file), split="train[:8]", truncation=True, max_length=48)
    cfg = make_cfg(
        tmp_path, model_dir, corpus_file, projection_dim=0, modules=["gpt_neox.layers.*"], data=data
    )
    ours = build(cfg)
    legacy, _ = legacy_store_of_model(tmp_path / "legacy", model_dir, rows=1)
    sizes = json.loads((legacy / "info.json").read_text())["grad_sizes"]
    assert [f"gpt_neox.{n}" for n in sizes] == ours.modules
    write_legacy_part(
        tmp_path / "legacy",
        np.asarray(ours.all),
        sizes,
        ["t"] * len(ours),
        dtype="float32",
        model=str(model_dir),
    )
    with pytest.raises(BergsonError, match=r"no module shapes.*bergson convert"):  # in place
        Attributor(tmp_path / "legacy").collector_for(load_model(cfg)[0].base_model)
    # a projected store of the original: its matrices cannot be regenerated for a query
    projected = write_legacy_part(
        tmp_path / "projected",
        np.ones((1, 16 * len(sizes)), np.float32),
        dict.fromkeys(sizes, 16),
        ["t"],
        dtype="float32",
        projection_dim=4,
        model=str(model_dir),
    )
    with pytest.raises(BergsonError, match="another library's matrices"):
        Attributor(convert_store(projected, tmp_path / "projected-conv").root).collector_for(
            load_model(cfg)[0].base_model
        )
    conv = convert_store(tmp_path / "legacy", tmp_path / "conv")
    assert conv.modules == ours.modules
    assert conv.manifest.model["base_model"] == ours.manifest.model["base_model"] == "gpt_neox"
    assert [m.shape for m in conv.manifest.modules] == [m.shape for m in ours.manifest.modules]
    model, tok = load_model(cfg)
    text = json.loads(Path(corpus_file).read_text().splitlines()[5])["text"]
    ids = tok(text, return_tensors="pt", truncation=True, max_length=48)["input_ids"]
    found = []
    for path in (ours.root, conv.root):
        with Attributor(path).trace(model.base_model, 3) as result:
            model(ids, labels=ids).loss.backward()
            model.zero_grad()
        found.append((result.indices.clone(), result.scores.clone()))
    assert found[0][0][0, 0].item() == 5
    assert torch.equal(found[0][0], found[1][0]) and torch.allclose(found[0][1], found[1][1])


def test_convert_names_split_heads_like_ours(tmp_path, model_dir):
    """The original's ``NAME.head_<i>`` blocks (heads on the output features) become our
    ``NAME.head<i>`` blocks, with the layout column_layouts gives that split."""
    from bergson import AttentionConfig
    from bergson.core.layout import column_layouts
    from tests.helpers.legacy_store import model_skeleton

    model = model_skeleton(model_dir)
    qkv = "gpt_neox.layers.0.attention.query_key_value"
    ours = column_layouts({qkv: model.get_submodule(qkv)}, 0, False, {qkv: AttentionConfig(2, 48, 0)})
    sizes = {f"layers.0.attention.query_key_value.head_{h}": m.dim for h, m in enumerate(ours)}
    write_legacy_part(
        tmp_path / "old", np.zeros((1, sum(sizes.values())), np.float32), sizes, ["t"], dtype="float32"
    )
    conv = convert_store(tmp_path / "old", tmp_path / "new", model=str(model_dir))
    assert conv.manifest.modules == ours
