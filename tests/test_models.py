"""Model loading and module discovery: PEFT adapters, unsupported layers, device and dtype."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from bergson import BergsonError, build
from bergson.collect.loop import collect_gradients
from bergson.data import TokenizedDocs
from bergson.models import find_tracked_modules, resolve_dtype
from tests.helpers.assets import tiny_neox
from tests.helpers.stores import make_cfg


def test_patterns_and_unsupported_layer_warning(caplog):
    model = tiny_neox()
    mlp = find_tracked_modules(model, ["*.mlp.*"])
    assert mlp and all(".mlp." in n for n in mlp)
    model.gpt_neox.extra = nn.Conv2d(2, 2, 3)  # a weight matrix bergson cannot track
    with caplog.at_level(logging.WARNING):
        find_tracked_modules(model)
    assert "Conv2d" in caplog.text
    with pytest.raises(BergsonError, match="no supported layers"):
        find_tracked_modules(model, ["nothing.*"])


def test_precision_choices():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_bf16_model_collects_in_float32():
    model = tiny_neox(dtype=torch.bfloat16)
    docs = TokenizedDocs([np.arange(1, 9)], np.zeros(1, np.int64))
    sink = collect_gradients(model, docs, progress=False)
    assert (
        sink.vectors.dtype == np.float64
        and np.isfinite(sink.vectors).all()
        and np.abs(sink.vectors).sum() > 0
    )


def test_peft_adapter_tracks_only_adapter_layers(tmp_path, model_dir, corpus_file):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["query_key_value"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    (adapter / "adapter_config.json").write_text(
        (adapter / "adapter_config.json")
        .read_text()
        .replace('"base_model_name_or_path": null', f'"base_model_name_or_path": "{model_dir}"')
    )
    store = build(make_cfg(tmp_path, adapter, corpus_file, projection_dim=0))
    names = store.modules
    assert names and all("lora_" in n for n in names), names
    assert any(n.endswith("lora_A.default") for n in names) and any(
        n.endswith("lora_B.default") for n in names
    )
    # full gradients of an adapter layer have the adapter's own shape
    a = store.manifest.module(next(n for n in names if n.endswith("lora_A.default")))
    assert a.shape == [2, 32] and a.dim == 64
