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
    # coverage: the adapter's matrices are the share's whole (the frozen base weights are listed apart)
    cov = store.manifest.model["coverage"]
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.ndim >= 2)
    assert (cov["matrix_params"], cov["tracked_params"], cov["share"]) == (lora_params, lora_params, 1.0)
    base = sum(
        p.numel()
        for n, p in model.named_parameters()
        if "lora_" not in n and p.ndim >= 2 and "embed" not in n
    )
    assert [(s["class"], s["reason"], s["params"]) for s in cov["skipped"]] == [("Linear", "peft_base", base)]
    with pytest.raises(BergsonError, match="PEFT model's adapter layers are all tracked"):
        find_tracked_modules(model, include_output_head=True)


# --- coverage: which share of the model's matrix weights is tracked (issue 19, item 3) ---


def _tiny_olmoe_dir(root, model_dir):
    """A 2-layer OLMoE (hidden 16, 4 fused experts, random init) saved with model_dir's tokenizer."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeConfig

    out = root / "olmoe"
    out.mkdir()
    for f in model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = OlmoeConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out, cfg


def _olmoe_shares(cfg) -> tuple[int, int, int]:
    """(attention, router, expert) matrix parameters of the OLMoE config, from its shapes."""
    h, i, e, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_hidden_layers
    attention = layers * 4 * h * h  # q, k, v, o (as many kv heads as heads)
    router = layers * e * h
    experts = layers * (e * 2 * i * h + e * h * i)  # fused gate_up (e, 2i, h) and down (e, h, i)
    return attention, router, experts


def test_coverage_of_a_dense_model_counted_from_shapes(caplog):
    from bergson.models import announce_coverage, tracking_record

    model = tiny_neox()  # vocab 48, hidden 16, 2 layers, intermediate 32, untied head
    v, h, i, layers = 48, 16, 32, 2
    body = layers * (3 * h * h + h * h + i * h + h * i)  # qkv, dense, h_to_4h, 4h_to_h
    record = tracking_record(model, find_tracked_modules(model))
    cov = record["coverage"]
    assert (cov["matrix_params"], cov["tracked_params"], cov["share"]) == (body, body, 1.0)
    assert cov["embedding_params"] == v * h and cov["head_params"] == v * h
    assert not cov["head_tied_to_embedding"] and record["output_head"] == {
        "modules": ["lm_head"],
        "tracked": [],
    }
    assert cov["skipped"] == [] and not cov["low"]

    # --modules choosing the MLP: half of the body, the attention layers listed as not matched
    mlp = tracking_record(model, find_tracked_modules(model, ["*.mlp.*"]), modules_option=True)["coverage"]
    attention = layers * (3 * h * h + h * h)
    assert (mlp["matrix_params"], mlp["tracked_params"]) == (body, body - attention)
    assert mlp["skipped"] == [
        {
            "class": "Linear",
            "reason": "not_matched",
            "modules": 2 * layers,
            "params": attention,
            "note": mlp["skipped"][0]["note"],
        }
    ]
    assert "--modules" in mlp["skipped"][0]["note"]

    # the head: tracked with --include_output_head, outside the share either way; tied counts once
    with_head = tracking_record(model, find_tracked_modules(model, include_output_head=True))
    assert with_head["output_head"]["tracked"] == ["lm_head"] and with_head["coverage"]["share"] == 1.0
    model.lm_head.weight = model.gpt_neox.embed_in.weight
    tied = tracking_record(model, find_tracked_modules(model))["coverage"]
    assert (
        tied["head_tied_to_embedding"] and tied["head_params"] == v * h and tied["embedding_params"] == v * h
    )

    # the console line says the same
    with caplog.at_level(logging.INFO, logger="bergson.models"):
        announce_coverage(record)
    assert f"100.0% of the model's matrix weights ({body:,} of {body:,}" in caplog.text
    assert "output head lm_head" in caplog.text and "--include_output_head" in caplog.text
    assert "ONLY" not in caplog.text


def test_low_coverage_of_a_moe_model_warns_and_is_recorded(tmp_path, model_dir, corpus_file, caplog):
    """Fused 3-D experts and routers are not tracked by default: the share is low, the warning names
    them and --track_experts, the manifest records the numbers; an explicit --modules silences the
    warning but not the record; --track_experts tracks everything."""
    olmoe, cfg = _tiny_olmoe_dir(tmp_path, model_dir)
    attention, router, experts = _olmoe_shares(cfg)
    share = attention / (attention + router + experts)
    assert share < 0.5

    with caplog.at_level(logging.INFO, logger="bergson"):
        store = build(make_cfg(tmp_path, olmoe, corpus_file, projection_dim=4))
    cov = store.manifest.model["coverage"]
    assert (cov["matrix_params"], cov["tracked_params"]) == (attention + router + experts, attention)
    assert cov["share"] == pytest.approx(share, abs=1e-6) and cov["low"] and not cov["modules_option"]
    assert [(s["class"], s["reason"], s["modules"], s["params"]) for s in cov["skipped"]] == [
        ("OlmoeExperts", "fused_experts", 2, experts),
        ("OlmoeTopKRouter", "router", 2, router),
    ]
    loud = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ONLY" in r.getMessage()
    ]
    assert len(loud) == 1
    assert f"{100 * share:.1f}%" in loud[0] and "OlmoeExperts" in loud[0] and "OlmoeTopKRouter" in loud[0]
    assert "--track_experts tracks them" in loud[0] and "--modules" in loud[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bergson"):
        chosen = build(
            make_cfg(tmp_path, olmoe, corpus_file, name="attn", projection_dim=4, modules=["*.self_attn.*"])
        )
    cov = chosen.manifest.model["coverage"]
    assert cov["modules_option"] and not cov["low"] and cov["tracked_params"] == attention
    assert cov["share"] == pytest.approx(share, abs=1e-6)
    assert "ONLY" not in caplog.text and f"{100 * share:.1f}% of the model's matrix weights" in caplog.text

    full = build(make_cfg(tmp_path, olmoe, corpus_file, name="all", projection_dim=4, track_experts=True))
    cov = full.manifest.model["coverage"]
    assert cov["share"] == 1.0 and cov["skipped"] == [] and not cov["low"]
    assert cov["tracked_params"] == attention + router + experts


def test_trainer_callback_announces_and_records_coverage(tmp_path, caplog):
    """The callback prints the same coverage line as the build and its epoch stores record it."""
    from bergson import GradientCollectorCallback, prepare_for_gradient_collection
    from bergson.store import load_gradients
    from tests.helpers.trainer import _trainer

    callback = GradientCollectorCallback(tmp_path / "grads", modules=["*.mlp.*"], save_dtype="float32")
    trainer = _trainer(tmp_path, [callback], num_rows=4, num_train_epochs=1, gradient_accumulation_steps=1)
    model = trainer.model
    mlp = sum(m.weight.numel() for n, m in model.named_modules() if ".mlp." in n and isinstance(m, nn.Linear))
    body = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if n.startswith("gpt_neox.") and isinstance(m, nn.Linear)
    )
    with caplog.at_level(logging.INFO, logger="bergson"):
        prepare_for_gradient_collection(trainer).train()
    cov = load_gradients(callback.stores[0]).manifest.model["coverage"]
    assert (cov["tracked_params"], cov["matrix_params"]) == (mlp, body) and 0 < mlp < body
    assert cov["modules_option"] and not cov["low"]
    assert (
        f"tracking {100 * mlp / body:.1f}% of the model's matrix weights ({mlp:,} of {body:,}" in caplog.text
    )


def test_mixtral_fused_experts_and_router_are_counted_as_skipped(caplog):
    from transformers import AutoModelForCausalLM, MixtralConfig

    from bergson.models import announce_coverage, tracking_record

    h, i, e, layers, v = 16, 32, 4, 2, 64
    cfg = MixtralConfig(
        vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=e, num_experts_per_tok=2, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    attention = layers * (h * h + 2 * (h // 2) * h + h * h)  # q, k and v (one kv head of 8), o
    router, experts = layers * e * h, layers * e * 3 * i * h
    record = tracking_record(model, find_tracked_modules(model))
    cov = record["coverage"]
    assert (cov["matrix_params"], cov["tracked_params"]) == (attention + router + experts, attention)
    assert cov["embedding_params"] == v * h and cov["head_params"] == v * h and cov["low"]
    assert [(s["class"], s["reason"], s["params"]) for s in cov["skipped"]] == [
        ("MixtralExperts", "fused_experts", experts),
        ("MixtralTopKRouter", "router", router),
    ]
    with caplog.at_level(logging.WARNING, logger="bergson.models"):
        announce_coverage(record)
    assert "MixtralExperts" in caplog.text and "--track_experts tracks them" in caplog.text
    assert "--include_output_head" in caplog.text  # the head's option, named in the loud warning too
    full = tracking_record(model, find_tracked_modules(model, track_experts=True))["coverage"]
    assert (
        full["tracked_params"] == attention + router + experts
        and full["share"] == 1.0
        and not full["skipped"]
    )
