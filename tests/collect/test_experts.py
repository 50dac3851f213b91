"""Mixture-of-experts layers in transformers' fused form, tracked per expert and per router.

Ground truth is one backward pass per document through the unmodified model (float64): the
gradient of expert e is the slice [e] of the fused parameter's gradient, the router's is its
weight's. Four families (OLMoE, Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE), documents of
different lengths packed into padded batches.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from bergson import BergsonError
from bergson.collect.engine import PassEngine
from bergson.collect.hooks import GradientCollector, LayerTap
from bergson.collect.loop import collect_gradients
from bergson.collect.losses import document_batches, lm_loss
from bergson.core.experts import ExpertLinear, installed, is_fused_experts, is_router
from bergson.core.layout import module_shape
from bergson.models import find_tracked_modules, tracking_record
from bergson.transforms.projection import projection_matrix
from tests.helpers.families import SHARED
from tests.helpers.gradients import naive_gradients, random_docs

VOCAB = 40
FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 8}),
}


def tiny(family: str) -> nn.Module:
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        **{**SHARED, "vocab_size": VOCAB},
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        experts_implementation="eager",  # grouped_mm has no float64
        **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).double().eval()
    with torch.no_grad():  # routers start at zero: give the routing something to choose
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model = tiny(request.param)
    modules = find_tracked_modules(model, track_experts=True)
    return request.param, model, modules


@pytest.fixture(scope="module")
def docs():
    return random_docs(5, VOCAB, seed=3, lo=3, hi=11)


def test_views_leave_the_model_and_its_output_unchanged(family):
    """The views add nothing to the model; while installed, the per-expert forward gives the
    model's own output; afterwards the model's forward is its own again."""
    _, model, modules = family
    keys, names = list(model.state_dict()), [n for n, _ in model.named_modules()]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    want = model(ids).logits
    with installed(modules.values()):
        got = model(ids).logits
        owners = {id(m.owner) for m in modules.values() if isinstance(m, ExpertLinear)}
        assert all("forward" in m.__dict__ for m in model.modules() if id(m) in owners)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == names
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_tracked_set_and_coverage(family, caplog):
    """With track_experts every expert of every layer (both projections) and every router is a
    block and the coverage is all the matrix weights; by default they are left out, loudly."""
    _, model, modules = family
    experts = [m for m in model.modules() if is_fused_experts(m)]
    routers = [m for m in model.modules() if is_router(m)]
    assert len(experts) == len(routers) == 2
    views = [n for n, m in modules.items() if isinstance(m, ExpertLinear)]
    assert len(views) == 2 * (4 * 2 + 1)
    assert any(n.endswith(".experts.expert3.down_proj") for n in views)
    record = tracking_record(model, modules)["coverage"]
    assert record["share"] == 1.0 and record["skipped"] == []
    with caplog.at_level(logging.WARNING):
        default = find_tracked_modules(model)
    assert "--track_experts" in caplog.text
    assert not any(isinstance(m, ExpertLinear) for m in default.values())
    low = tracking_record(model, default)["coverage"]
    assert low["share"] < 1.0
    assert {s["reason"] for s in low["skipped"]} == {"fused_experts", "router"}
    assert all("--track_experts" in s["note"] for s in low["skipped"])
    # a pattern can name a single expert without the option
    one = find_tracked_modules(model, ["*.layers.1.mlp.experts.expert2.*"])
    assert [n.rsplit(".", 2)[-2:] for n in one] == [["expert2", "gate_up_proj"], ["expert2", "down_proj"]]


@pytest.mark.parametrize("p,per_token", [(0, False), (4, False), (4, True)])
def test_gradients_equal_naive_autograd(family, docs, p, per_token):
    """Every expert's and router's block (full, and projected L G Rᵀ) equals its slice of the
    fused parameter's gradient of each document alone; per-token vectors sum to the rows."""
    _, model, modules = family
    truth = naive_gradients(model, docs, modules, include_bias=False)
    sink = collect_gradients(
        model,
        docs,
        modules=modules,
        projection_dim=p,
        token_batch_size=40,
        progress=False,
        per_token=per_token,
    )
    for name, rows in sink.by_module().items():
        grads = [w for w, _ in truth[name]]
        if p:
            out, n_in = module_shape(modules[name])
            left = projection_matrix(0, name, "left", p, out, dtype=torch.float64)
            right = projection_matrix(0, name, "right", p, n_in, dtype=torch.float64)
            grads = [left @ w @ right.T for w in grads]
        want = np.stack([w.flatten().numpy() for w in grads])
        np.testing.assert_allclose(rows, want, rtol=1e-9, atol=1e-12, err_msg=name)
    experts = [n for n, m in modules.items() if isinstance(m, ExpertLinear) and m.index is not None]
    hit = sum(np.abs(sink.by_module()[n]).max() > 0 for n in experts)
    assert hit == len(experts)  # the check is not vacuous: every expert met some document's tokens
    if per_token:
        for row in range(len(docs)):
            toks = sink.tokens[row]
            assert toks is not None and toks.shape[0] == docs.lengths[row]
            np.testing.assert_allclose(toks.sum(0), sink.vectors[row], rtol=1e-9, atol=1e-12)


def test_batch_composition_does_not_change_rows(family, docs):
    _, model, modules = family
    one, many = (
        collect_gradients(model, docs, modules=modules, projection_dim=4, token_batch_size=b, progress=False)
        for b in (10, 64)
    )
    np.testing.assert_allclose(one.vectors, many.vectors, rtol=1e-9, atol=1e-12)


def test_layer_tap_gives_the_documents_factors(family, docs):
    """The statistics hooks (K-FAC, EK-FAC, per-token scores) get x [B, T, in] and g [B, T, out] of
    an expert on the batch's grid, so Σ_t g_t x_tᵀ per document is the expert's gradient."""
    _, model, modules = family
    names = [
        n
        for n in modules
        if n.endswith("layers.0.mlp.experts.expert1.down_proj") or n.endswith("layers.1.mlp.gate")
    ]
    assert len(names) == 2
    seen: dict[str, torch.Tensor] = {}

    def fn(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        assert x.ndim == 3 and x.shape[:2] == g.shape[:2]
        seen[name] = torch.einsum("bto,bti->boi", g, x)

    batches = list(document_batches(docs, [np.arange(len(docs))], 0, torch.device("cpu")))
    PassEngine(model, lm_loss(docs, "sum"), progress=False).run(
        batches, hooks=LayerTap({n: modules[n] for n in names}, fn)
    )
    truth = naive_gradients(model, docs, {n: modules[n] for n in names}, False)
    for name in names:
        for n, (w, _) in enumerate(truth[name]):
            torch.testing.assert_close(seen[name][n], w, rtol=1e-9, atol=1e-12)


def test_ekfac_on_experts_matches_dense_algebra(docs):
    """EK-FAC's corrected eigenvalues of an expert block are diag(Qᵀ F Q) of the exact empirical
    Fisher of its per-document gradients, in the eigenbasis EK-FAC fitted."""
    from bergson.methods.custom import fit_ekfac

    model = tiny("olmoe")
    names = ["model.layers.0.mlp.experts.expert2.gate_up_proj", "model.layers.1.mlp.gate"]
    modules = {n: m for n, m in find_tracked_modules(model, track_experts=True).items() if n in names}
    batches = list(document_batches(docs, [np.arange(3), np.arange(3, 5)], 0, torch.device("cpu")))
    factors = fit_ekfac(model, batches, lm_loss(docs, "sum"), modules=modules, progress=False)
    truth = naive_gradients(model, docs, modules, False)
    for name in names:
        g = torch.stack([w for w, _ in truth[name]]).reshape(len(docs), -1)
        fisher = g.T @ g / len(docs)
        d = factors.eigen.tensors[name]
        q = torch.kron(d["S_eigenvectors"], d["A_eigenvectors"])
        got = factors.corrected.tensors[name]["eigenvalues"].reshape(-1)
        torch.testing.assert_close(got, torch.diag(q.T @ fisher @ q), rtol=1e-7, atol=1e-12)


def test_normalizers_read_the_experts_slice_of_the_optimizer_state():
    """An Adam state of a fused (experts x out x in) parameter gives expert e the slice [e]."""
    from bergson.transforms.normalizers import AdamNormalizer
    from bergson.transforms.optimizer_state import normalizers_from_optimizer

    model = tiny("mixtral")
    modules = find_tracked_modules(model, track_experts=True)
    opt = torch.optim.Adam(model.parameters())
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    opt.step()
    norms = normalizers_from_optimizer(opt, modules, form="adam")
    assert norms is not None
    name = "model.layers.1.mlp.experts.expert3.down_proj"
    view = modules[name]
    assert isinstance(view, ExpertLinear)
    norm = norms[name]
    assert isinstance(norm, AdamNormalizer)
    debias = 1 - 0.999  # one step of Adam's default beta2: the normalizer holds the bias-corrected moment
    assert torch.count_nonzero(norm.weight) > 0
    torch.testing.assert_close(norm.weight, opt.state[view.source]["exp_avg_sq"][3] / debias)
    router = norms["model.layers.0.mlp.gate"]
    assert isinstance(router, AdamNormalizer)
    gate = modules["model.layers.0.mlp.gate"]
    assert isinstance(gate, ExpertLinear)
    torch.testing.assert_close(router.weight, opt.state[gate.source]["exp_avg_sq"] / debias)


def test_expert_outside_a_known_batch_shape_is_refused():
    """Routed rows can only be mapped back to documents when the batch's shape is known: a forward
    on embeddings of unknown shape is refused by name instead of giving wrong rows."""
    model = tiny("olmoe")
    name = "model.layers.0.mlp.experts.expert0.down_proj"
    collector = GradientCollector(model, [name], projection_dim=2)
    with collector, pytest.raises(BergsonError, match=r"expert0\.down_proj.*batch shape"):
        model.model.layers[0].mlp(torch.randn(1, 3, 16, dtype=torch.float64))


def test_track_experts_on_a_dense_model_is_refused():
    from tests.helpers.families import make_family

    with pytest.raises(BergsonError, match=r"--track_experts.*no fused mixture-of-experts"):
        find_tracked_modules(make_family("llama"), track_experts=True)


def test_cli_build_and_trace_with_track_experts(tmp_path, corpus_file):
    """``bergson build --track_experts`` on a saved OLMoE: the manifest records every expert and
    router block and full coverage; rows do not depend on the batch they were built in; tracing a
    query through the Attributor (the model run by hand, outside the pass engine) finds its own
    document first."""
    import json

    from transformers import AutoTokenizer

    from bergson import Attributor, load_gradients
    from bergson.cli import main
    from bergson.collect.losses import per_document_loss
    from tests.helpers.assets import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia")
    model = tiny("olmoe").float()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    args = ["build", "--model", str(tmp_path / "moe"), "--dataset", str(corpus_file), "--track_experts"]
    args += ["--data.truncation", "--data.max_length", "16", "--projection_dim", "4", "--precision", "fp32"]
    args += ["--save_dtype", "float32"]
    stores = {}
    for budget in (128, 16):  # 8 documents of 16 tokens a batch, then one a batch
        main([args[0], str(tmp_path / f"run{budget}"), *args[1:], "--token_batch_size", str(budget)])
        stores[budget] = load_gradients(tmp_path / f"run{budget}")
    store = stores[128]
    experts = [n for n in store.modules if ".mlp.experts.expert" in n]
    assert len(experts) == 2 * 4 * 2 and "model.layers.1.mlp.gate" in store.modules
    assert store.manifest.model["coverage"]["share"] == 1.0
    batched, alone = (np.asarray(stores[b].all, np.float64) for b in (128, 16))
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())

    text = json.loads(corpus_file.read_text().splitlines()[5])["text"]
    ids = torch.tensor([tokenizer(text, truncation=True, max_length=16)["input_ids"]])
    traced = load_gradients(tmp_path / "run128")
    with Attributor(traced.root, unit_norm=True).trace(model, 1) as result:
        per_document_loss(model(ids).logits, ids).sum().backward()
    assert int(result.indices[0, 0]) == 5
    assert float(result.scores[0, 0]) == pytest.approx(1.0, abs=1e-4)

    # aggregated: two blocks per MoE layer instead of eight, traced the same way
    main([args[0], str(tmp_path / "agg"), *args[1:], "--aggregate_experts"])
    agg = load_gradients(tmp_path / "agg")
    blocks = [m for m in agg.manifest.modules if m.experts]
    assert [m.name for m in blocks][:2] == [
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]
    assert len(blocks) == 4 and agg.manifest.total_dim == store.manifest.total_dim - 2 * 6 * 16
    with Attributor(agg.root, unit_norm=True).trace(model, 1) as result:
        per_document_loss(model(ids).logits, ids).sum().backward()
    assert int(result.indices[0, 0]) == 5
    assert float(result.scores[0, 0]) == pytest.approx(1.0, abs=1e-4)


def test_original_moe_experts_patterns():
    """The original package's ``--moe_experts`` (globs naming fused experts modules) tracks the
    experts of the modules named, and only those; it and --track_experts are not combined."""
    from bergson import IndexConfig

    model = tiny("qwen3_moe")
    cfg = IndexConfig(moe_experts="layers.1.mlp.experts")  # spelled from the base model, as the original did
    tracked = find_tracked_modules(model, track_experts=cfg.tracked_experts())
    views = [n for n, m in tracked.items() if isinstance(m, ExpertLinear)]
    assert len(views) == 8 and all(n.startswith("model.layers.1.mlp.experts.expert") for n in views)
    assert len(tracked) - len(views) == len(find_tracked_modules(model))
    with pytest.raises(BergsonError, match=r"--moe_experts 'layers\.9\.mlp\.experts' names no fused experts"):
        find_tracked_modules(model, track_experts=["layers.9.mlp.experts"])
    with pytest.raises(BergsonError, match="--track_experts and --moe_experts: give one"):
        IndexConfig(track_experts=True, moe_experts="*.experts").tracked_experts()


@pytest.mark.parametrize("per_token", [False, True])
def test_aggregated_blocks_project_the_stacked_gradient(docs, per_token):
    """--aggregate_experts: one block per fused parameter, L [G_0; ...; G_3] Rᵀ with each expert's own
    left matrix (the columns of one left matrix of the stacked rows) and the parameter's right one."""
    p = 4
    model = tiny("olmoe")
    modules = find_tracked_modules(model, track_experts=True)
    truth = naive_gradients(model, docs, modules, include_bias=False)
    sink = collect_gradients(
        model, docs, modules=modules, projection_dim=p, token_batch_size=40, progress=False,
        per_token=per_token, aggregate_experts=True,
    )  # fmt: skip
    layouts = GradientCollector(model, modules, projection_dim=p, aggregate_experts=True).layouts
    by_name = {m.name: m for m in layouts}
    agg = by_name["model.layers.1.mlp.experts.down_proj"]
    assert agg.shape == [4 * 16, 8] and agg.dim == p * p
    assert agg.experts == [f"model.layers.1.mlp.experts.expert{e}.down_proj" for e in range(4)]
    assert len(layouts) == 2 * (4 + 1 + 2)  # q, k, v, o, the router and two expert blocks per layer
    got = sink.by_module()
    assert set(got) == set(by_name)
    for name, layout in by_name.items():
        views = layout.experts or [name]
        right = projection_matrix(0, name, "right", p, layout.shape[1], dtype=torch.float64)
        want = np.zeros((len(docs), p * p))
        for v in views:
            left = projection_matrix(0, v, "left", p, module_shape(modules[v])[0], dtype=torch.float64)
            want += np.stack([(left @ w @ right.T).flatten().numpy() for w, _ in truth[v]])
        np.testing.assert_allclose(got[name], want, rtol=1e-9, atol=1e-12, err_msg=name)
    if per_token:
        for row in range(len(docs)):
            np.testing.assert_allclose(sink.tokens[row].sum(0), sink.vectors[row], rtol=1e-9, atol=1e-12)


def test_aggregation_refusals():
    from bergson import IndexConfig

    model = tiny("olmoe")
    modules = find_tracked_modules(model, track_experts=True)
    with pytest.raises(BergsonError, match=r"--aggregate_experts needs --projection_dim > 0"):
        GradientCollector(model, modules, projection_dim=0, aggregate_experts=True)
    with pytest.raises(BergsonError, match=r"--aggregate_experts without --track_experts"):
        IndexConfig(aggregate_experts=True).tracked_experts()


def test_trainer_callback_tracks_experts(tmp_path):
    """The Trainer callback with ``track_experts=True`` on an OLMoE: with a zero learning rate every
    step sees the same weights, so each stored row is the row collect_gradients gives (the experts run
    through their views for the whole training run, numerically as the model's own forward)."""
    from bergson import GradientCollectorCallback, load_gradients, prepare_for_gradient_collection
    from bergson.collect.loop import collect_gradients
    from bergson.data import TokenizedDocs
    from tests.helpers.trainer import _token_ids, _trainer

    model = tiny("olmoe").float()
    model.resize_token_embeddings(8192)  # the shipped tokenizer's vocabulary
    ids = _token_ids(8)
    callback = GradientCollectorCallback(
        tmp_path / "grads", save_dtype="float32", track_experts=True, normalize=False
    )
    trainer = _trainer(
        tmp_path, [callback], num_rows=8, model=model, num_train_epochs=1, learning_rate=0.0, weight_decay=0.0
    )
    prepare_for_gradient_collection(trainer).train()
    store = load_gradients(callback.stores[0])
    assert sum(".experts.expert" in n for n in store.modules) == 16
    model.eval()
    docs = TokenizedDocs([np.asarray(i) for i in ids], np.zeros(len(ids), np.int64))
    modules = find_tracked_modules(model, track_experts=True)
    want = collect_gradients(model, docs, modules=modules, projection_dim=16, progress=False).vectors
    got = np.asarray(store.all, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_gradient_checkpointing(docs, checkpointing):
    """Layers rerun during backward (the experts' per-expert loop included) still give every
    document its own experts' gradients, under both checkpoint forms."""
    from bergson.collect.losses import per_document_loss

    p = 4
    reference = tiny("olmoe")
    modules = find_tracked_modules(reference, track_experts=True)
    truth = naive_gradients(reference, docs, modules, include_bias=False)
    model = tiny("olmoe").train()  # checkpointing is active in training mode only; OLMoE has no dropout
    model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    tracked = find_tracked_modules(model, track_experts=True)
    length = max(len(s) for s in docs.input_ids)
    ids = torch.zeros(len(docs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(docs.input_ids):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.as_tensor(seq), 1
    with GradientCollector(model, tracked, projection_dim=p) as collector:
        out = model(input_ids=ids, attention_mask=mask)
        per_document_loss(out.logits, ids.masked_fill(mask == 0, -100)).sum().backward()
    got = collector.gradients
    for name in [n for n in tracked if ".experts." in n or n.endswith(".mlp.gate")]:
        out_dim, n_in = module_shape(tracked[name])
        left = projection_matrix(0, name, "left", p, out_dim, dtype=torch.float64)
        right = projection_matrix(0, name, "right", p, n_in, dtype=torch.float64)
        want = np.stack([(left @ w @ right.T).flatten().numpy() for w, _ in truth[name]])
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-8, atol=1e-12, err_msg=name)


def test_model_configuration_reports_with_experts():
    """``test_model_configuration --track_experts`` on an OLMoE compares the experts' blocks too and
    reports the model consistent on the CPU in fp32."""
    from bergson import ModelConfigTestConfig, load_model
    from bergson.diagnostics import test_model_configuration
    from tests.helpers.assets import ASSETS

    def loader(opts):
        _, tokenizer = load_model(opts)
        model = tiny("olmoe").float()
        model.resize_token_embeddings(len(tokenizer))
        return model, tokenizer

    cfg = ModelConfigTestConfig(
        model=str(ASSETS / "tiny-pythia"), device="cpu", precision="fp32", num_documents=3, projection_dim=4,
        track_experts=True,
    )  # fmt: skip
    report = test_model_configuration(cfg, loader=loader)
    assert report["consistent_as_configured"] is True, report
    first = report["settings"][0]
    assert first["status"] == "tested" and first["padded_max_rel_error"] < 1e-4
    assert first["blocks"] == 2 * (4 + 1 + 4 * 2)  # attention, the router and every expert's two blocks


def test_ekfac_statistics_of_an_expert_no_token_reaches():
    """An expert no example reaches has zero statistics of its own shape (not a missing entry), and
    its preconditioned gradient is zero (no curvature, and every training gradient of it is zero)
    rather than a division by a zero relative damping."""
    from bergson.methods.ekfac.passes import correction_sums, covariance_sums, example_gradients
    from bergson.transforms.ekfac import Factors, eigendecompose, ihvp

    model = tiny("olmoe")
    modules = {
        n: m
        for n, m in find_tracked_modules(model, track_experts=True).items()
        if "layers.0.mlp.experts.expert1" in n
    }

    class Unreached:
        include_bias, num_rows = False, 3

        def __init__(self) -> None:
            self.modules = modules

        def run(self, desc, fn, labels) -> int:
            return 3  # three examples, none of which reached these experts

    sums, positions, n = covariance_sums(Unreached(), torch.float64)
    name = "model.layers.0.mlp.experts.expert1.down_proj"
    assert n == 3 and positions[name] == 0
    assert sums[name]["A"].shape == (8, 8) and sums[name]["S"].shape == (16, 16)
    assert not any(t.any() for d in sums.values() for t in d.values())
    grads = example_gradients(Unreached())
    assert grads[name].shape == (3, 16, 8) and not grads[name].any()
    eigen = eigendecompose(Factors(sums))
    corrections = correction_sums(Unreached(), eigen, torch.float64)
    assert corrections[name].shape == (16, 8)
    query = torch.randn(2, 16, 8, dtype=torch.float64)
    out = ihvp(eigen, corrections[name], name, query, damping=0.1, mode="relative")
    assert torch.equal(out, torch.zeros_like(query))


def test_experts_in_an_unsupported_form_are_refused_with_the_reason():
    """Expert-parallel (or FSDP-sharded) experts cannot run per expert here: --track_experts names why,
    and the coverage record counts them as skipped for that reason."""
    model = tiny("mixtral")
    for m in model.modules():
        if is_fused_experts(m) or is_router(m):
            m._is_expert_parallel = True  # what transformers sets under expert parallelism
    with pytest.raises(
        BergsonError, match=r"--track_experts: .*MixtralExperts: its experts are split across ranks"
    ):
        find_tracked_modules(model, track_experts=True)
    skipped = tracking_record(model, find_tracked_modules(model))["coverage"]["skipped"]
    assert {s["reason"] for s in skipped} == {"experts_unsupported"}


def test_views_do_not_keep_their_model_alive():
    """The views are cached per experts module; the cache must not keep a model alive once the user
    drops it (real MoE models are gigabytes)."""
    import gc
    import weakref

    model = tiny("olmoe")
    modules = find_tracked_modules(model, track_experts=True)
    with installed(modules.values()):
        model(torch.randint(0, VOCAB, (1, 4)))
    ref = weakref.ref(model)
    del model, modules
    gc.collect()
    assert ref() is None
