"""The model matrix: every dense decoder family users fine-tune, tiny and random, in float64.

Per family: the default tracked layers; per-example gradients (full, p = 0, and projected, p > 0)
equal to one backward pass per document with documents of different lengths padded into one batch;
the same vectors whether a document is batched with others or alone; and
``test_model_configuration`` reporting on the model. The MoE families (OLMoE, Mixtral, Qwen2-MoE,
Qwen3-MoE) are in tests/collect/test_experts.py.
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
from bergson.core.layout import column_layouts, module_shape
from bergson.models import config_attention_heads, find_tracked_modules
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


def test_config_attention_heads_split_the_gradient(family, docs, truth):
    """``--attention_heads auto``'s splits, derived from the config (GQA and fused qkv included):
    every head's full block (p = 0) is the naive gradient's rows (q/k/v) or columns (output
    projection) of that head, in the layer's weight layout."""
    family_name, model = family
    modules = find_tracked_modules(model)
    heads = config_attention_heads(model, modules)
    if family_name == "llama_lora":
        assert heads == {}  # adapter layers are not split
        return
    assert len(heads) == (4 if family_name in ("gpt2", "gpt_neox", "phi3", "falcon") else 8)
    sink = collect_gradients(model, docs, projection_dim=0, token_batch_size=64, progress=False, heads=heads)
    blocks = sink.by_module()
    layouts = [m for m in column_layouts(modules, 0, False, heads) if m.head]
    assert len(layouts) == sum(h.num_heads for h in heads.values())
    rtol = RTOL.get(family_name, 1e-9)
    for m in layouts:
        h = m.head
        assert h is not None
        span = slice(h["start"], h["stop"])
        conv1d = type(modules[h["module"]]).__name__ == "Conv1D"
        rows = []
        for w, _ in truth[h["module"]]:
            part = w[span] if h["axis"] == "out" else w[:, span]
            rows.append((part.T if conv1d else part).flatten().numpy())
        np.testing.assert_allclose(
            blocks[m.name], np.stack(rows), rtol=rtol, atol=1e-3 * rtol, err_msg=m.name
        )


def _changed_heads(model, layer: str, out_heads, out_name: str, perturb) -> set[int]:
    """Which heads of the output projection's input change when ``perturb`` edits the model."""
    proj = model.get_submodule(out_name)
    seen = []
    handle = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    ids = torch.arange(1, 9)[None]
    try:
        with torch.no_grad():
            model(ids)
            saved = perturb()
            model(ids)
            saved()
    finally:
        handle.remove()
    diff = (seen[1] - seen[0]).abs().amax(dim=(0, 1))
    size = out_heads.head_size
    return {i for i in range(out_heads.num_heads) if diff[i * size : (i + 1) * size].max() > 1e-9}


def test_config_attention_heads_are_the_model_heads(family):
    """Semantics of the derived splits: perturbing the rows of one q/k/v (or fused qkv) block
    changes exactly the attention heads that block feeds, as seen at the output projection's input
    (a key/value head feeds its group of query heads). OLMo-2 normalizes q and k across all heads,
    so there only v is checked."""
    family_name, model = family
    if family_name == "llama_lora":
        return
    modules = find_tracked_modules(model)
    heads = config_attention_heads(model, modules)
    layer0 = {n: h for n, h in heads.items() if ".0." in n}
    (out_name,) = [n for n, h in layer0.items() if h.axis == "in"]
    n = layer0[out_name].num_heads
    cfg = model.config
    kv = 1 if family_name == "falcon" else getattr(cfg, "num_key_value_heads", None) or n
    group = n // kv
    checked = 0
    for name, split in layer0.items():
        if split.axis == "in" or (family_name == "olmo2" and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj")):
            continue
        module = modules[name]
        conv1d = type(module).__name__ == "Conv1D"
        leaf = name.rsplit(".", 1)[-1]
        for i in range(split.num_heads):
            span = slice(i * split.head_size, (i + 1) * split.head_size)

            def perturb(module=module, span=span, conv1d=conv1d):
                w = module.weight
                old = w.detach().clone()
                noise = torch.randn_like(w[:, span] if conv1d else w[span])
                if conv1d:
                    w[:, span] += noise
                else:
                    w[span] += noise
                return lambda: w.copy_(old)

            if leaf == "q_proj" or (split.num_heads == n and leaf != "v_proj" and leaf != "k_proj"):
                want = {i}  # a query head, or one head's q, k and v together (NeoX-style fused)
            elif leaf in ("k_proj", "v_proj"):
                want = set(range(i * group, (i + 1) * group))
            else:  # a [q; k; v] stack of n + 2 kv heads
                want = {i} if i < n else set(range(((i - n) % kv) * group, ((i - n) % kv + 1) * group))
            assert _changed_heads(model, name, layer0[out_name], out_name, perturb) == want, (name, i)
            checked += 1
    assert checked >= 2
