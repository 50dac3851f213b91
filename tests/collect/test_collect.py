"""Per-example gradients against a naive per-example autograd loop (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bergson import AdamNormalizer, GradientCollector, collect_gradients
from bergson.collect.losses import per_document_loss
from bergson.core.layout import module_shape
from bergson.data import TokenizedDocs
from bergson.models import find_tracked_modules
from bergson.transforms.projection import projection_matrix
from tests.helpers.assets import tiny_gpt2, tiny_neox
from tests.helpers.gradients import dense_second_moments, naive_gradients, random_docs

MODELS = {"neox": tiny_neox, "gpt2": tiny_gpt2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
@pytest.mark.parametrize("include_bias", [False, True])
@pytest.mark.parametrize("norm", [None, "adafactor", "adam"])
@pytest.mark.parametrize("p", [0, 4])
def test_matches_naive_autograd(arch, include_bias, norm, p):
    model = MODELS[arch]()
    modules = find_tracked_modules(model)
    docs = random_docs(5, model.config.vocab_size)
    naive = naive_gradients(model, docs, modules, include_bias)
    ada, adam = dense_second_moments(modules, include_bias)
    normalizers = {"adafactor": ada, "adam": adam}.get(norm) if norm else None

    sink = collect_gradients(
        model,
        docs,
        projection_dim=p,
        include_bias=include_bias,
        normalizers=normalizers,
        token_batch_size=40,
        seed=3,
        progress=False,
    )
    got = sink.by_module()
    assert sink.vectors.shape[0] == len(docs)
    for name, m in modules.items():
        for n, (w, b) in enumerate(naive[name]):
            has_bias = b is not None
            g = torch.cat([w, b[:, None]], 1) if has_bias else w
            if norm == "adafactor":
                g = g / ada[name].dense(has_bias).sqrt()
            elif norm == "adam":
                v = adam[name].weight
                if has_bias:
                    v = torch.cat([v, adam[name].bias[:, None]], 1)
                g = g / v.sqrt()
            if p:
                out, _ = module_shape(m)
                left = projection_matrix(3, name, "left", p, out, dtype=torch.float64)
                right = projection_matrix(3, name, "right", p, g.shape[1], dtype=torch.float64)
                expected = (left @ g @ right.T).flatten()
            else:
                w_part = g[:, : w.shape[1]]
                if type(m).__name__ == "Conv1D":
                    w_part = w_part.T  # back to the parameter's own (in, out) layout
                expected = torch.cat([w_part.flatten(), g[:, w.shape[1]]]) if has_bias else w_part.flatten()
            actual = torch.from_numpy(np.ascontiguousarray(got[name][n]))
            assert rel_err(actual, expected) <= 1e-6, (name, n)


def test_full_gradient_layout_is_weight_grad_flatten():
    """p=0 vectors are literally weight.grad.flatten() (then bias) of each document."""
    model = tiny_gpt2()
    modules = find_tracked_modules(model)
    docs = random_docs(2, model.config.vocab_size, seed=4)
    sink = collect_gradients(model, docs, projection_dim=0, include_bias=True, progress=False)
    name = "transformer.h.0.attn.c_attn"
    m = modules[name]
    model.zero_grad()
    model.requires_grad_(True)
    ids = torch.as_tensor(docs.input_ids[1])[None]
    per_document_loss(model(ids).logits, ids).sum().backward()
    expected = torch.cat([m.weight.grad.flatten(), m.bias.grad])
    got = torch.from_numpy(np.ascontiguousarray(sink.by_module()[name][1]))
    assert rel_err(got, expected) <= 1e-10


@pytest.mark.parametrize(("arch", "rtol"), [("gpt2", 1e-10), ("neox", 1e-5)])
def test_padding_and_batch_size_invariance(arch, rtol):
    """A document's vector does not depend on its batch, its padding or the token budget.

    GPT-2 is exact in float64. GPT-NeoX computes its rotary tables in float32 inside
    transformers, and float32 cos/sin of the same position can differ by one ulp between
    sequence lengths, so there the agreement is at float32 precision.
    """
    model = MODELS[arch]()
    docs = random_docs(9, model.config.vocab_size, seed=5, lo=2, hi=20)
    ref = collect_gradients(model, docs, token_batch_size=20, progress=False).vectors
    scale = np.abs(ref).max()
    for budget in (40, 64, 500):
        other = collect_gradients(model, docs, token_batch_size=budget, progress=False).vectors
        np.testing.assert_allclose(other, ref, rtol=rtol, atol=rtol * scale)
    # a document alone equals the same document inside a padded batch
    alone = collect_gradients(model, TokenizedDocs([docs.input_ids[3]], docs.loss_start[:1]), progress=False)
    np.testing.assert_allclose(alone.vectors[0], ref[3], rtol=rtol, atol=rtol * scale)


def test_completion_mask_and_mean_reduction():
    model = tiny_neox()
    seq = np.arange(1, 11)
    docs = TokenizedDocs([seq], np.array([6]))
    modules = find_tracked_modules(model)
    naive = naive_gradients(model, docs, modules, include_bias=False)
    sink = collect_gradients(model, docs, projection_dim=0, progress=False)
    name = next(iter(modules))
    np.testing.assert_allclose(sink.by_module()[name][0], naive[name][0][0].flatten().numpy(), rtol=1e-9)
    mean = collect_gradients(model, docs, projection_dim=0, loss_reduction="mean", progress=False)
    # 4 loss tokens (positions 6..9): the mean is the sum divided by 4
    np.testing.assert_allclose(mean.vectors, sink.vectors / 4, rtol=1e-9)
    np.testing.assert_allclose(mean.loss * 4, sink.loss, rtol=1e-9)


def test_trivial_documents_are_zero_rows():
    model = tiny_neox()
    docs = TokenizedDocs([np.array([], np.int64), np.array([5]), np.array([1, 2, 3])], np.zeros(3, np.int64))
    sink = collect_gradients(model, docs, progress=False)
    assert np.all(sink.vectors[:2] == 0) and np.any(sink.vectors[2] != 0)
    assert list(sink.num_tokens) == [0, 1, 3]


def test_closure_and_dict_modes_agree_and_params_untouched():
    model = tiny_neox()
    ids = torch.as_tensor(random_docs(1, model.config.vocab_size).input_ids[0])[None].repeat(2, 1)
    seen: dict[str, torch.Tensor] = {}
    with GradientCollector(model, projection_dim=4, closure=lambda n, g: seen.__setitem__(n, g)):
        per_document_loss(model(ids).logits, ids).sum().backward()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    with GradientCollector(model, projection_dim=4) as c:
        per_document_loss(model(ids).logits, ids).sum().backward()
    assert set(c.gradients) == set(seen)
    for n in seen:
        torch.testing.assert_close(c.gradients[n], seen[n])
        assert c.gradients[n].shape == (2, 16)
    # with frozen parameters no weight gradient is ever computed
    assert all(p.grad is None for p in model.parameters())


def test_user_mistakes_raise_the_library_error():
    from bergson import BergsonError

    model = tiny_neox()
    with pytest.raises(BergsonError, match="no module named 'nope'"):
        GradientCollector(model, ["nope"])
    with pytest.raises(BergsonError, match="projection_dim"):
        GradientCollector(model, projection_dim=-1)
    name = next(iter(find_tracked_modules(model)))
    with pytest.raises(BergsonError, match="untracked"):
        GradientCollector(model, [name], normalizers={"other": AdamNormalizer(torch.ones(1, 1))})
    ids = torch.as_tensor(random_docs(1, model.config.vocab_size).input_ids[0])[None]
    with pytest.raises(BergsonError, match="reduction 'max'"):
        per_document_loss(model(ids).logits, ids, "max")


def test_the_pass_engine_restores_flags_and_counts_examples():
    from bergson.collect.engine import PassEngine

    model = tiny_neox()
    model.get_submodule(next(iter(find_tracked_modules(model)))).requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    docs = random_docs(5, model.config.vocab_size)
    batches = [torch.as_tensor(docs.input_ids[i])[None] for i in range(5)]
    seen: list[int] = []
    engine = PassEngine(model, lambda m, ids: per_document_loss(m(ids).logits, ids), progress=False)
    with torch.no_grad():  # the engine enables gradients for its pass
        count = engine.run(
            batches,
            hooks=GradientCollector(model, projection_dim=2),
            on_batch=lambda batch, losses: seen.append(engine.seen),
        )
    assert count == 5 and seen == [0, 1, 2, 3, 4] and engine.batch is None
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ the original package's form
def _tokenized(docs: TokenizedDocs, masked_row: int, masked: int, advantage: list[float]):
    from datasets import Dataset

    labels = [seq.tolist() for seq in docs.input_ids]
    labels[masked_row][:masked] = [-100] * masked
    return Dataset.from_dict(
        {
            "text": [f"doc {i}" for i in range(len(docs))],
            "input_ids": [seq.tolist() for seq in docs.input_ids],
            "labels": labels,
            "advantage": advantage,
        }
    )


def test_original_form_writes_a_store_and_returns_its_dataset(tmp_path, caplog):
    """collect_gradients(model=, data=, processor=, path=) gives the vectors of our form for the
    same documents (labels -100 mask the loss, advantage weights it), as a Dataset view of the
    store it wrote, and accepts the 2.5.1 positional form with a config."""
    from bergson import GradientProcessor, IndexConfig, load_gradient_dataset, load_gradients

    model = tiny_neox()
    docs = random_docs(5, model.config.vocab_size, seed=1, lo=6)
    weights = [1.0, 2.0, 0.5, 1.0, -1.0]
    data = _tokenized(docs, 2, 3, weights)
    processor = GradientProcessor(projection_dim=4, projection_seed=3, projection_type="rademacher")
    out = collect_gradients(model=model, data=data, processor=processor, path=str(tmp_path / "run"))
    ref = collect_gradients(
        model,
        TokenizedDocs(docs.input_ids, np.array([0, 0, 3, 0, 0]), None, np.array(weights)),
        projection_dim=4,
        seed=3,
        progress=False,
    )
    assert out.column_names == [
        "text",
        "input_ids",
        "labels",
        "advantage",
        "row_id",
        "num_tokens",
        "loss",
        "gradients",
    ]
    got = np.asarray(out.with_format("numpy")["gradients"], np.float64)
    np.testing.assert_allclose(got, ref.vectors, rtol=1e-5, atol=1e-6 * np.abs(ref.vectors).max())
    np.testing.assert_allclose(out["loss"], ref.loss, rtol=1e-6)
    assert out["text"] == data["text"]
    store = load_gradients(tmp_path / "run")
    assert store.manifest.projection == {
        "kind": "gaussian_two_sided",
        "dim": 4,
        "seed": 3,
        "include_bias": False,
    }
    assert store.manifest.producer["substitutions"] == [
        "projection_type='rademacher': Gaussian (normal) matrices are used"
    ]
    assert "rademacher" in caplog.text
    # reopened from disk: the saved rows (data.hf) come back beside the gradients
    again = load_gradient_dataset(tmp_path / "run")
    assert again["text"] == data["text"] and again["gradients"] == out["gradients"]
    # the 2.5.1 form: (model, data, processor, cfg)
    cfg = IndexConfig(run_path=str(tmp_path / "run2"), token_batch_size=64)
    positional = collect_gradients(model, data, processor, cfg)
    assert positional["gradients"] == out["gradients"]


def test_original_form_refuses_what_it_cannot_honour(tmp_path):
    from datasets import Dataset

    from bergson import BergsonError, GradientProcessor

    model = tiny_neox()
    data = _tokenized(random_docs(2, model.config.vocab_size, lo=6), 0, 1, [1.0, 1.0])
    with pytest.raises(BergsonError, match="preconditioner_path"):
        collect_gradients(
            model=model, data=data, processor=GradientProcessor(hessians={"x": 1}), path=str(tmp_path)
        )
    with pytest.raises(BergsonError, match="per_module"):
        collect_gradients(
            model=model, data=data, processor=GradientProcessor(projection_target="global"), path="x"
        )
    with pytest.raises(BergsonError, match="input_ids"):
        collect_gradients(model=model, data=Dataset.from_dict({"text": ["a"]}), path=str(tmp_path / "a"))
    bad = data.map(lambda r: {"labels": [5] * len(r["input_ids"])})
    with pytest.raises(BergsonError, match="labels"):
        collect_gradients(model=model, data=bad, path=str(tmp_path / "b"))
    with pytest.raises(BergsonError, match="pass each once"):
        collect_gradients(
            model=model, data=data, processor=GradientProcessor(projection_dim=4), path="c", projection_dim=8
        )
    # module names relative to base_model, as the original wrote them; other IndexConfig fields pass
    out = collect_gradients(
        model=model,
        data=data,
        path=str(tmp_path / "e"),
        target_modules={"layers.0.attention.dense"},
        projection_dim=2,
    )
    assert out.info is not None and len(out[0]["gradients"]) == 4
    from bergson import load_gradients

    assert load_gradients(tmp_path / "e").modules == ["gpt_neox.layers.0.attention.dense"]
    with pytest.raises(BergsonError, match="unknown options"):
        collect_gradients(model=model, data=data, path=str(tmp_path / "d"), not_an_option=1)
