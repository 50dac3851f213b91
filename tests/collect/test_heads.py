"""Attention-head blocks against naive per-example autograd (float64), for both axes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bergson import collect_gradients
from bergson.collect.hooks import GradientCollector
from bergson.core.layout import AttentionConfig
from bergson.errors import BergsonError
from bergson.models import find_tracked_modules
from bergson.transforms.projection import projection_matrix
from tests.helpers.assets import tiny_gpt2, tiny_neox
from tests.helpers.cli import run_in_process as run
from tests.helpers.gradients import dense_second_moments, naive_gradients, random_docs
from tests.helpers.standins import TINYSTORIES, make_standins

QKV, DENSE = "gpt_neox.layers.1.attention.query_key_value", "gpt_neox.layers.1.attention.dense"
# tiny_neox: hidden 16, 2 heads of 8; the fused qkv (48 x 16) groups its rows per head (3 x 8)
HEADS = {QKV: AttentionConfig(2, 24, 0), DENSE: AttentionConfig(2, 8, 1)}


def head_slices(name: str) -> list[tuple[slice, slice]]:
    cfg = HEADS[name]
    spans = [slice(h * cfg.head_size, (h + 1) * cfg.head_size) for h in range(cfg.num_heads)]
    return [(s, slice(None)) if cfg.head_dim == 0 else (slice(None), s) for s in spans]


@pytest.mark.parametrize("norm", [None, "adafactor", "adam"])
@pytest.mark.parametrize("p", [0, 4])
def test_heads_against_naive_autograd(p, norm):
    model = tiny_neox()
    modules = find_tracked_modules(model, [QKV, DENSE])
    docs = random_docs(4, model.config.vocab_size, seed=2)
    naive = naive_gradients(model, docs, modules, include_bias=False)
    ada, adam = dense_second_moments(modules, include_bias=False)
    normalizers = {"adafactor": ada, "adam": adam}.get(norm) if norm else None
    sink = collect_gradients(
        model, docs, modules=modules, projection_dim=p, seed=5, normalizers=normalizers, heads=HEADS,
        progress=False, token_batch_size=24,
    )  # fmt: skip
    got = sink.by_module()
    assert list(got) == [f"{m}.head{h}" for m in (QKV, DENSE) for h in range(2)]
    for name in (QKV, DENSE):
        for n, (w, _) in enumerate(naive[name]):
            g = w
            if norm == "adafactor":
                g = g / ada[name].dense().sqrt()
            elif norm == "adam":
                g = g / adam[name].weight.sqrt()
            blocks = []
            for h, (rows, cols) in enumerate(head_slices(name)):
                block = g[rows, cols]
                vec = torch.from_numpy(np.ascontiguousarray(got[f"{name}.head{h}"][n]))
                if p:
                    left = projection_matrix(
                        5, f"{name}.head{h}", "left", p, block.shape[0], dtype=torch.float64
                    )
                    right = projection_matrix(
                        5, f"{name}.head{h}", "right", p, block.shape[1], dtype=torch.float64
                    )
                    torch.testing.assert_close(vec, (left @ block @ right.T).flatten(), rtol=1e-7, atol=1e-12)
                else:
                    blocks.append(vec.reshape(block.shape))
            if not p:
                # the head blocks put back together along their axis are the module's gradient
                axis = HEADS[name].head_dim
                torch.testing.assert_close(torch.cat(blocks, axis), g, rtol=1e-9, atol=1e-14)


def test_output_axis_heads_carry_their_bias_and_concatenate_to_the_module():
    """p = 0 with biases: the output-axis blocks, concatenated, are the unsplit module's vector."""
    model = tiny_gpt2()
    name = "transformer.h.0.attn.c_attn"  # Conv1D, 48 outputs = q, k, v of 2 heads of 8
    docs = random_docs(3, model.config.vocab_size, seed=7)
    whole = collect_gradients(
        model, docs, modules=[name], projection_dim=0, include_bias=True, progress=False
    )
    split = collect_gradients(
        model, docs, modules=[name], projection_dim=0, include_bias=True, progress=False,
        heads={name: AttentionConfig(6, 8, 0)},
    )  # fmt: skip
    blocks = split.by_module()
    w = whole.vectors[:, : 48 * 16].reshape(-1, 16, 48)  # Conv1D layout (in, out)
    b = whole.vectors[:, 48 * 16 :]
    for h in range(6):
        rows = slice(8 * h, 8 * h + 8)
        expected = np.concatenate([w[:, :, rows].reshape(3, -1), b[:, rows]], 1)
        np.testing.assert_allclose(
            blocks[f"{name}.head{h}"], expected, rtol=1e-10, atol=1e-12 * np.abs(b).max()
        )


def test_head_errors():
    model = tiny_neox()
    modules = find_tracked_modules(model)
    with pytest.raises(
        BergsonError, match=r"5 heads x 8 features = 40, but .* its out axis \(head_dim=0\) has 48"
    ):
        GradientCollector(model, modules, heads={QKV: AttentionConfig(5, 8, 0)})
    with pytest.raises(BergsonError, match="bias belongs to no head"):
        GradientCollector(model, modules, include_bias=True, heads={DENSE: AttentionConfig(2, 8, 1)})
    with pytest.raises(BergsonError, match="match no tracked module"):
        GradientCollector(model, modules, heads={"*.attention.qkv": AttentionConfig(2, 24, 0)})
    for bad in ("dense=2:8", "dense=2:8:sideways", "=2:8:in", "dense=two:8:in"):
        with pytest.raises(BergsonError, match="--attention_heads"):
            AttentionConfig.parse(bad)
    assert AttentionConfig.parse("*.dense=2:8:in") == ("*.dense", AttentionConfig(2, 8, 1))
    assert AttentionConfig.parse("*.qkv=2:24:2") == (
        "*.qkv",
        AttentionConfig(2, 24, 0),
    )  # the original's axis
    for bad_axis in (3, -1, True):
        with pytest.raises(BergsonError, match=r"accepted values are 0 .*1 .*and 2, the original package's"):
            AttentionConfig(16, 4, bad_axis)


def test_cli_build_and_query_with_heads(tmp_path, model_dir, corpus_file):
    """Per-head stores through the CLI (its entry point, in this process); the Attributor rebuilds
    the head split from the manifest."""
    store = tmp_path / "heads"
    # model_dir: hidden 32, 2 heads of 16
    run(
        "build",
        str(store),
        "--model",
        str(model_dir),
        "--dataset",
        str(corpus_file),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--projection_dim",
        "4",
        "--save_dtype",
        "float32",
        "--truncation",
        "--max_length",
        "48",
        "--modules",
        "layers.*.attention.*",
        "--attention_heads",
        "*.query_key_value=2:48:out",
        "layers.*.attention.dense=2:16:in",
    )  # fmt: skip  (patterns spelled from the base model, as the original)
    manifest = json.loads((store / "manifest.json").read_text())
    names = [m["name"] for m in manifest["modules"]]
    assert names[:4] == [
        f"gpt_neox.layers.0.attention.{m}.head{h}" for m in ("query_key_value", "dense") for h in (0, 1)
    ]
    assert manifest["modules"][2]["head"] == {
        "module": "gpt_neox.layers.0.attention.dense", "index": 0, "num_heads": 2, "axis": "in", "start": 0, "stop": 16
    }  # fmt: skip
    assert manifest["modules"][2]["shape"] == [32, 16]
    out = run("query", "--index", str(store), "--model", str(model_dir), "--precision", "fp32", "--device", "cpu",
              "--query", "The history of the city", "--top_k", "3").stdout  # fmt: skip
    assert "row" in out
    # --attention_heads auto derives the same splits from the model's config: the same store
    common = ["--model", str(model_dir), "--dataset", str(corpus_file), "--precision", "fp32", "--device", "cpu",
              "--projection_dim", "4", "--save_dtype", "float32", "--truncation", "--max_length", "48",
              "--modules", "layers.*.attention.*"]  # fmt: skip
    run("build", str(tmp_path / "auto"), *common, "--attention_heads", "auto")
    auto = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert [m["name"] for m in auto["modules"]] == names
    assert [m["head"] for m in auto["modules"]] == [m["head"] for m in manifest["modules"]]
    from bergson import load_gradients

    np.testing.assert_array_equal(
        np.asarray(load_gradients(tmp_path / "auto").all), np.asarray(load_gradients(store).all)
    )
    bad = run(
        "build",
        str(tmp_path / "bad-auto"),
        *common,
        "--attention_heads",
        "auto",
        "*.dense=2:16:in",
        check=False,
    )
    assert bad.returncode != 0 and "give it alone" in bad.stderr
    proc = run("build", str(tmp_path / "bad"), "--model", str(model_dir), "--dataset", str(corpus_file),
               "--device", "cpu", "--attention_heads", "*.dense=3:16:in", check=False)  # fmt: skip
    assert (
        proc.returncode != 0
        and "3 heads x 16 features = 48" in proc.stderr
        and "Traceback" not in proc.stderr
    )


# The original README's per-head snippet, on the GPT-Neo stand-in of RonenEldan/TinyStories-1M (16 heads of 4)
README_KEY, NEO_OUT = "h.0.attn.attention.out_proj", "transformer.h.0.attn.attention.out_proj"


@pytest.fixture(scope="module")
def tinystories(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = make_standins(tmp_path_factory.mktemp("standins"))
    return (
        AutoModelForCausalLM.from_pretrained(root / TINYSTORIES, attn_implementation="eager").double().eval()
    )


@pytest.mark.parametrize("p", [0, 4])
def test_readme_attention_config_splits_the_output_axis(tinystories, p):
    """AttentionConfig(num_heads=16, head_size=4, head_dim=2) keyed by the base-model name: the
    original's 2 is the output-feature axis; the blocks equal our spelling's and naive autograd's."""
    model = tinystories
    assert AttentionConfig(num_heads=16, head_size=4, head_dim=2) == AttentionConfig(16, 4, 0)
    docs = random_docs(3, model.config.vocab_size, seed=4)
    kw = dict(projection_dim=p, seed=3, progress=False, token_batch_size=32)
    readme = collect_gradients(
        model, docs, modules=[README_KEY], heads={README_KEY: AttentionConfig(num_heads=16, head_size=4, head_dim=2)}, **kw
    )  # fmt: skip
    ours = collect_gradients(model, docs, modules=[NEO_OUT], heads={NEO_OUT: AttentionConfig(16, 4, 0)}, **kw)
    got = readme.by_module()
    assert list(got) == [f"{NEO_OUT}.head{h}" for h in range(16)] == list(ours.by_module())
    np.testing.assert_array_equal(readme.vectors, ours.vectors)
    naive = naive_gradients(model, docs, {NEO_OUT: model.get_submodule(NEO_OUT)}, include_bias=False)[NEO_OUT]
    for n, (w, _) in enumerate(naive):
        assert w.shape == (64, 64)
        for h in range(16):
            block = w[4 * h : 4 * h + 4, :]  # rows: output features 4h .. 4h+3
            vec = torch.from_numpy(np.ascontiguousarray(got[f"{NEO_OUT}.head{h}"][n]))
            if p:
                left = projection_matrix(3, f"{NEO_OUT}.head{h}", "left", p, 4, dtype=torch.float64)
                right = projection_matrix(3, f"{NEO_OUT}.head{h}", "right", p, 64, dtype=torch.float64)
                block = left @ block @ right.T
            torch.testing.assert_close(vec, block.flatten(), rtol=1e-7, atol=1e-12)


def test_readme_attention_config_errors(tinystories):
    model = tinystories
    # heads that do not tile the axis: the message gives the product and the axis' size
    with pytest.raises(
        BergsonError, match=r"8 heads x 4 features = 32, but the layer is 64 \(out\) x 64 \(in\)"
    ):
        GradientCollector(model, None, heads={README_KEY: AttentionConfig(8, 4, head_dim=2)})
    # a key naming no tracked module lists tracked ones, in both spellings
    with pytest.raises(
        BergsonError, match=r"'h\.9\.attn\.attention\.out_proj' match no tracked module.*also spelled 'h\.0\."
    ):
        GradientCollector(model, None, heads={"h.9.attn.attention.out_proj": AttentionConfig(16, 4, 2)})
    # the output head is not tracked by default, so heads cannot be asked of it
    with pytest.raises(BergsonError, match="'lm_head' match no tracked module"):
        GradientCollector(model, None, heads={"lm_head": AttentionConfig(2, 4096, 0)})
