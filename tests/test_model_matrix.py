"""The model matrix: every dense decoder family users fine-tune, tiny and random, in float64.

Per family: the default tracked layers; per-example gradients (full, p = 0, and projected, p > 0)
equal to one backward pass per document with documents of different lengths padded into one batch;
the same vectors whether a document is batched with others or alone; and
``test_model_configuration`` reporting on the model. The MoE families are covered elsewhere.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bergson.diagnostics as diagnostics
from bergson import ModelConfigTestConfig
from bergson.collect.loop import collect_gradients
from bergson.core.layout import module_shape
from bergson.models import find_tracked_modules
from bergson.transforms.projection import projection_matrix
from tests.helpers.assets import ASSETS
from tests.helpers.families import FAMILIES, VOCAB, make_family
from tests.helpers.gradients import naive_gradients, random_docs

# layers tracked by default (the body, not lm_head): leaf names and count over the 2 layers
EXPECTED = {
    "gpt2": ({"c_attn", "c_proj", "c_fc"}, 8),
    "gpt_neox": ({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}, 8),
    "gpt_neo": ({"q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"}, 12),
    "phi3": ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, 8),
    "falcon": ({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}, 8),
    "llama_lora": ({"lora_A.default", "lora_B.default"}, 8),
}
LLAMA_LIKE = ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 14)

# GPT-Neo's eager attention casts query and key to float32 whatever the model's dtype, so its
# gradients agree with autograd (and batched with alone) to float32 rounding of the scores only.
RTOL = {"gpt_neo": 1e-4}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, make_family(request.param)


@pytest.fixture(scope="module")
def docs():
    # lengths 5..10: mixed lengths pad each batch; no two fit in a 10-token batch
    return random_docs(4, VOCAB, seed=5, lo=5, hi=11)


@pytest.fixture(scope="module")
def truth(family, docs):
    _, model = family
    return naive_gradients(model, docs, find_tracked_modules(model), include_bias=False)


def leaf(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if "lora_" in name else parts[-1]


def test_default_tracked_layers(family):
    name, model = family
    tracked = find_tracked_modules(model)
    leaves, count = EXPECTED.get(name, LLAMA_LIKE)
    assert {leaf(n) for n in tracked} == leaves and len(tracked) == count
    assert not any(n.endswith("lm_head") for n in tracked)


def test_full_gradients_equal_naive_autograd(family, docs, truth):
    """p = 0 keeps the gradient in the layer's weight layout: (out, in), GPT-2's Conv1D (in, out)."""
    family_name, model = family
    sink = collect_gradients(model, docs, projection_dim=0, token_batch_size=64, progress=False)
    by_module = sink.by_module()
    modules = find_tracked_modules(model)
    assert set(by_module) == set(truth)
    for name, rows in by_module.items():
        conv1d = type(modules[name]).__name__ == "Conv1D"
        want = np.stack([(w.T if conv1d else w).flatten().numpy() for w, _ in truth[name]])
        assert np.abs(want).max() > 0, name  # the comparison is not vacuous
        rtol = RTOL.get(family_name, 1e-9)
        np.testing.assert_allclose(rows, want, rtol=rtol, atol=1e-3 * rtol, err_msg=name)


def test_projected_gradients_equal_naive_autograd(family, docs, truth):
    family_name, model = family
    p = 4
    sink = collect_gradients(model, docs, projection_dim=p, token_batch_size=64, progress=False)
    modules = find_tracked_modules(model)
    for name, rows in sink.by_module().items():
        out, n_in = module_shape(modules[name])
        left = projection_matrix(0, name, "left", p, out, dtype=torch.float64)
        right = projection_matrix(0, name, "right", p, n_in, dtype=torch.float64)
        want = np.stack([(left @ w @ right.T).flatten().numpy() for w, _ in truth[name]])
        rtol = RTOL.get(family_name, 1e-8)
        np.testing.assert_allclose(rows, want, rtol=rtol, atol=1e-3 * rtol, err_msg=name)


def test_batched_equals_alone(family, docs):
    """Documents padded together give the vectors each gives alone (10-token batches hold one)."""
    family_name, model = family
    together = collect_gradients(model, docs, projection_dim=4, token_batch_size=64, progress=False)
    alone = collect_gradients(model, docs, projection_dim=4, token_batch_size=10, progress=False)
    assert np.abs(alone.vectors).max() > 0
    rtol = RTOL.get(family_name, 1e-9)
    np.testing.assert_allclose(together.vectors, alone.vectors, rtol=rtol, atol=1e-3 * rtol)


def test_model_configuration_reports(family):
    """The diagnostic runs on the family (float32, the shipped tokenizer) and finds it consistent."""
    from transformers import AutoTokenizer

    _, model = family
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia")

    def loader(opts) -> tuple[nn.Module, object]:
        assert opts.precision == "fp32"
        return copy.deepcopy(model).to(torch.float32), tokenizer

    cfg = ModelConfigTestConfig(
        model="tiny", device="cpu", precision="fp32", num_documents=3, projection_dim=4
    )
    cfg.data.max_length = 12
    report = diagnostics.test_model_configuration(cfg, loader=loader)
    first = report["settings"][0]
    assert first["status"] == "tested" and first["dtype"] == "float32"
    assert len(set(report["lengths"])) > 1  # the padded batch mixes lengths
    assert first["padded_max_rel_error"] < 1e-4 and first["equal_length_max_rel_error"] < 1e-4
    assert report["consistent_as_configured"], diagnostics.format_report(report)
