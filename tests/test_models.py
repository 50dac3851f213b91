"""Model loading and module discovery: PEFT adapters, unsupported layers, device and dtype."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from bergson import BergsonError, build
from bergson.collect.loop import collect_gradients
from bergson.core.layout import base_model_prefix
from bergson.data import TokenizedDocs
from bergson.models import find_tracked_modules, load_model, output_head_modules, resolve_dtype
from tests.helpers.assets import tiny_gpt2, tiny_neox
from tests.helpers.stores import make_cfg


def test_patterns_and_unsupported_layer_warning(caplog):
    model = tiny_neox()
    mlp = find_tracked_modules(model, ["*.mlp.*"])
    assert mlp and all(".mlp." in n for n in mlp)
    model.gpt_neox.extra = nn.Conv2d(2, 2, 3)  # a weight matrix bergson cannot track
    with caplog.at_level(logging.WARNING):
        find_tracked_modules(model)
    assert "Conv2d" in caplog.text
    with pytest.raises(BergsonError, match=r"--modules 'nothing\.\*' names no supported layer"):
        find_tracked_modules(model, ["nothing.*"])


@pytest.mark.parametrize("make", [tiny_neox, tiny_gpt2])
def test_default_tracks_the_body_not_the_output_head(make):
    """As the original package: the layers inside model.base_model, not lm_head; the flag adds it."""
    model = make()
    prefix = base_model_prefix(model)
    supported = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    ]
    body = [n for n in supported if n.startswith(prefix + ".")]
    assert prefix in ("gpt_neox", "transformer") and supported == [*body, "lm_head"] and len(body) == 8
    assert list(find_tracked_modules(model)) == body
    assert list(find_tracked_modules(model, include_output_head=True)) == supported
    assert output_head_modules(model) == ["lm_head"]
    # patterns choose among every supported layer: a pattern naming the head tracks it
    assert list(find_tracked_modules(model, ["*"])) == supported
    assert list(find_tracked_modules(model, [f"{prefix}.*.mlp.*", "lm_head"]))[-1] == "lm_head"
    assert list(find_tracked_modules(model, ["*.mlp.*"], include_output_head=True))[-1] == "lm_head"


def test_patterns_spelled_from_the_base_model():
    """The original's names are relative to model.base_model; both spellings name the same layers."""
    model = tiny_gpt2()
    full = find_tracked_modules(model, ["transformer.h.0.*", "transformer.h.1.attn.c_proj"])
    assert list(full) == [*(f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
                          "transformer.h.1.attn.c_proj"]  # fmt: skip
    assert find_tracked_modules(model, ["h.0.*", "h.1.attn.c_proj"]) == full
    # a pattern spelled from the whole model does not leak into the head by stripping the prefix
    assert "lm_head" not in find_tracked_modules(model, ["transformer.*"])
    with pytest.raises(
        BergsonError, match=r"'h\.9\.\*' names no supported layer.*'transformer\.h\.0\.attn\.c_attn'"
    ):
        find_tracked_modules(model, ["h.0.*", "h.9.*"])  # each pattern must name a layer


def test_model_without_base_model_tracks_every_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert base_model_prefix(model) == "" and list(find_tracked_modules(model)) == ["0", "2"]
    with pytest.raises(BergsonError, match="--include_output_head: the model has no output head"):
        find_tracked_modules(model, include_output_head=True)


def test_only_a_head_and_the_default(caplog):
    model = tiny_neox()
    for name, m in model.gpt_neox.named_modules():  # a body without supported layers
        if isinstance(m, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.gpt_neox.get_submodule(parent), leaf, nn.Identity())
    with pytest.raises(
        BergsonError, match=r"only supported layers are its output head.*--include_output_head"
    ):
        find_tracked_modules(model)
    assert list(find_tracked_modules(model, include_output_head=True)) == ["lm_head"]


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
        base, peft.LoraConfig(r=2, target_modules=["query_key_value", "lm_head"], init_lora_weights=False)
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
    # every adapter layer is tracked, the head's too (PEFT models are not cut at base_model)
    model, _ = load_model(make_cfg(tmp_path, adapter, corpus_file))
    adapters = [n for n, _ in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert names == adapters and len(adapters) == 6 and names[-1] == "base_model.model.lm_head.lora_B.default"
    assert store.manifest.model["base_model"] == "base_model"
    assert store.manifest.model["output_head"] == {"modules": [], "tracked": []}
    with pytest.raises(BergsonError, match="PEFT model's adapter layers are all tracked"):
        find_tracked_modules(model, include_output_head=True)
