"""MAGIC against finite differences and real retraining, and `bergson validate` (float64 toys)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bergson import BergsonError
from bergson.collect import head_loss
from bergson.config import TrainingConfig
from bergson.methods.magic import reverse as reverse_module
from bergson.methods.magic.command import check_precision
from bergson.methods.magic.recipe import learning_rate, plan_steps
from bergson.methods.magic.replay import Replay, query_losses
from bergson.methods.magic.reverse import MagicRun, checkpoint_steps
from bergson.validation import correlations, draw_subsets, rank
from tests.helpers.assets import tiny_gpt2
from tests.helpers.families import FAMILIES, VOCAB, make_family
from tests.helpers.gradients import random_docs

# GPT-2's eager attention keeps float64 throughout (GPT-NeoX's upcasts its softmax to float32,
# which limits finite differences to ~1e-6), so the float64 checks use it.
RECIPE = TrainingConfig(
    optimizer="adamw",
    lr=0.05,
    weight_decay=0.1,
    schedule="cosine",
    warmup_steps=2,
    max_grad_norm=0.5,
    batch_size=2,
    grad_accumulation=2,
    epochs=2,
)


def _setup(recipe=RECIPE, n=12):
    model = tiny_gpt2(vocab=24, hidden=8, layers=1)
    docs = random_docs(n, 24, seed=1, lo=3, hi=9)
    queries = random_docs(2, 24, seed=5, lo=4, hi=8)
    return model, docs, queries, Replay(model, docs, recipe, progress=False)


def _metagradient(replay, model, queries, root, schedule="every", **kw):
    run = MagicRun(replay, root, schedule, **kw)
    final, _ = run.train()
    params = {k: v.detach().requires_grad_(True) for k, v in final.params.items()}
    q = query_losses(model, params, queries).mean()
    cot = dict(zip(params, torch.autograd.grad(q, list(params.values()))))
    return run, cot


def _per_query_cotangents(run, model, queries):
    """∂Q_j/∂θ_T of each query alone (the columns of --query_mode individual)."""
    final, _ = run.train()
    out = []
    for j in range(len(queries)):
        params = {k: v.detach().requires_grad_(True) for k, v in final.params.items()}
        q = query_losses(model, params, queries.select([j]))[0]
        out.append(dict(zip(params, torch.autograd.grad(q, list(params.values())))))
    return out


def _query_loss(replay, model, queries, w):
    state, _ = replay.run(w)
    return float(query_losses(model, state.params, queries).mean())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_metagradients_equal_finite_differences(tmp_path, optimizer):
    from dataclasses import replace

    recipe = replace(RECIPE, optimizer=optimizer, lr=0.05 if optimizer == "adamw" else 0.5)
    model, docs, queries, replay = _setup(recipe)
    assert replay.num_steps == 6
    # clipping is active: the clipped run differs from the unclipped one
    unclipped = Replay(model, docs, replace(recipe, max_grad_norm=0.0), progress=False)
    assert _query_loss(unclipped, model, queries, unclipped.ones()) != _query_loss(
        replay, model, queries, replay.ones()
    )
    run, cot = _metagradient(replay, model, queries, tmp_path)
    grads = run.reverse(cot).token_grads
    assert head_loss._PLAIN.get(model) is True  # through the fused, twice-differentiable head
    per_doc = replay.layout.per_document(grads[:, None])[:, 0]
    eps = 1e-4
    offsets = replay.layout.offsets
    for i in (0, 3, 7):
        plus, minus = replay.ones(), replay.ones()
        plus[offsets[i] : offsets[i + 1]] += eps
        minus[offsets[i] : offsets[i + 1]] -= eps
        fd = (_query_loss(replay, model, queries, plus) - _query_loss(replay, model, queries, minus)) / (
            2 * eps
        )
        assert per_doc[i] == pytest.approx(fd, rel=1e-5, abs=1e-9), (i, per_doc[i], fd)
    k = int(offsets[5]) + 2  # one token
    plus, minus = replay.ones(), replay.ones()
    plus[k] += eps
    minus[k] -= eps
    fd = (_query_loss(replay, model, queries, plus) - _query_loss(replay, model, queries, minus)) / (2 * eps)
    assert grads[k] == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # the first token of every document predicts nothing: its weight has no effect
    assert np.all(grads[offsets[:-1]] == 0)


def _reverse_step_by_both_routes(model, freeze=()):
    """Step 1 of a 4-document recipe (step 0's learning rate is 0 under warmup) through the fused
    head and through the logits: whether the fused route was taken, and that the loss, the new
    state and the step's vector-Jacobian product (at the state and at the token weights, for a
    random cotangent of the parameters and the momentum) agree."""
    from dataclasses import replace

    docs = random_docs(4, VOCAB, seed=3, lo=4, hi=9)
    # SGD with momentum: Adam's division by the second moment would amplify the rounding of
    # gradients that are zero in exact arithmetic (a key bias's) past any comparison
    recipe = replace(
        RECIPE, optimizer="sgd", momentum=0.9, lr=0.5, batch_size=4, grad_accumulation=1, freeze=list(freeze)
    )
    replay = Replay(model, docs, recipe, progress=False)
    out = []
    for fused in (True, False):
        head_loss._PLAIN.pop(model, None)
        if not fused:
            head_loss._PLAIN[model] = False  # as if the first batch had failed the check
        first, _ = replay.step(replay.initial_state(), 0, replay.ones())
        route = head_loss._PLAIN.get(model)
        state, loss = replay.step(first, 1, replay.ones())
        gen = torch.Generator().manual_seed(0)
        cot = state.like(
            [torch.randn((1, *x.shape), generator=gen, dtype=x.dtype).to(x.device) for x in state.tensors()]
        )
        back, wgrad = replay.step_vjp(first, 1, replay.ones(), cot)
        out.append((route, loss, [*state.tensors(), *back.tensors(), wgrad]))
    (route, loss, ours), (_, ref_loss, ref) = out
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert ours[-1].abs().max() > 0  # the token weights' term is not trivially zero
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * float(b.abs().max()))
    return route, replay


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_the_same_reverse_step_by_either_route(family):
    """One optimizer step and its vector-Jacobian product through the fused head equal those
    through the logits; the fused route is taken wherever the family's logits are its head's
    output."""
    route, _ = _reverse_step_by_both_routes(make_family(family))
    assert route is (family != "gemma2")  # gemma2 soft-caps its logits


@pytest.mark.parametrize(("family", "head"), [("llama", "lm_head.*"), ("gpt2", "transformer.wte.*")])
def test_a_frozen_head_gets_the_same_reverse_step_by_either_route(family, head):
    """A frozen output head (GPT-2's is tied to its input embeddings) through the fused route:
    no gradient is taken at it, and the step and its vector-Jacobian product are unchanged."""
    route, replay = _reverse_step_by_both_routes(make_family(family), freeze=[head])
    assert route is True
    assert not any(n.startswith(head[:-2]) for n in replay.names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fused_head_on_cuda_gets_the_same_reverse_step_by_either_route():
    """The fused head's kernels on a GPU (run by ``bash benchmarks/gpu.sh`` on a lent one)."""
    route, replay = _reverse_step_by_both_routes(make_family("llama").cuda())
    assert route is True and replay.device.type == "cuda"


def test_float32_metagradients_equal_float64_ones_under_adamw_with_a_key_bias(tmp_path):
    """GPT-2's key bias has a gradient that is zero in exact arithmetic (softmax ignores a shift
    shared by a row's scores), so in float32 its Adam second moment is rounding noise and the
    reverse pass's cotangent of that moment is huge. It must not reach the scores: those of a
    float32 run equal the float64 run's, per token, to a few float32 roundings."""
    import copy

    model, docs, queries, _ = _setup()
    grads = {}
    for dtype in (torch.float64, torch.float32):
        m = copy.deepcopy(model).to(dtype)
        replay = Replay(m, docs, RECIPE, progress=False)
        run, cot = _metagradient(replay, m, queries, tmp_path / str(dtype))
        grads[dtype] = run.reverse(cot).token_grads.astype(np.float64)
    ref, low = grads[torch.float64], grads[torch.float32]
    assert np.abs(ref).max() > 0
    assert np.abs(low - ref).max() <= 1e-4 * np.abs(ref).max()


def test_checkpoint_schedules_spilling_and_resume_give_the_same_metagradients(tmp_path, monkeypatch):
    model, _, queries, replay = _setup(n=16)
    assert replay.num_steps == 8
    assert checkpoint_steps("sqrt", 8) == [0, 3, 6]
    assert checkpoint_steps("log", 8) == [0, 4, 6, 7]
    assert checkpoint_steps("every", 3) == [0, 1, 2]
    runs = {}
    for schedule in ("every", "sqrt", "log"):
        run, cot = _metagradient(replay, model, queries, tmp_path / schedule, schedule)
        runs[schedule] = run.reverse(cot)
    ref = runs["every"].token_grads
    for schedule in ("sqrt", "log"):
        np.testing.assert_allclose(runs[schedule].token_grads, ref, rtol=1e-10, atol=1e-15)
    assert runs["every"].replayed_steps == runs["every"].graph_steps == 0
    # the sqrt segments' replays kept every step's graph for its reverse step: nothing replayed twice
    assert runs["sqrt"].replayed_steps == 0 and runs["sqrt"].graph_steps == 8 - 3
    # a zero memory budget keeps no graph and spills every replayed state to disk; a budget
    # of a byte keeps each segment's first graph only: same results
    for budget, replayed, graphs in ((0, 5, 0), (2, 2, 3)):
        run, cot = _metagradient(
            replay, model, queries, tmp_path / f"spill{budget}", "sqrt", memory_budget=budget
        )
        result = run.reverse(cot)
        assert (result.replayed_steps, result.graph_steps) == (replayed, graphs)
        np.testing.assert_allclose(result.token_grads, ref, rtol=1e-10, atol=1e-15)
    # where the memory in use cannot be measured (no glibc, no CUDA) no graph is kept
    monkeypatch.setattr(reverse_module, "allocated_bytes", lambda device: None)
    run, cot = _metagradient(replay, model, queries, tmp_path / "unmeasured", "sqrt")
    result = run.reverse(cot)
    assert (result.replayed_steps, result.graph_steps) == (5, 0)
    np.testing.assert_allclose(result.token_grads, ref, rtol=1e-10, atol=1e-15)
    monkeypatch.undo()
    # several queries' cotangents carried through one pass (vectorized or one backward each on
    # the shared graph) give each query's own pass; their mean is the aggregate column
    cots = _per_query_cotangents(run, model, queries)
    alone = np.stack([run.reverse(c).token_grads for c in cots], 1)
    np.testing.assert_allclose(alone.mean(1), ref, rtol=1e-10, atol=1e-15)
    assert np.abs(alone[:, 0] - alone[:, 1]).max() > 1e-3 * np.abs(alone).max()  # distinct columns
    for batched in ("vmap", "loop"):
        run.batched = batched
        together = run.reverse(cots[::-1]).token_grads
        assert together.shape == (replay.layout.size, 2)
        np.testing.assert_allclose(together, alone[:, ::-1], rtol=1e-10, atol=1e-15)

    # training killed at step 5 resumes from the last saved state and ends at the same state
    calls = {"n": 0}
    original = Replay.step

    def dies(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(Replay, "step", dies)
    with pytest.raises(KeyboardInterrupt):
        MagicRun(replay, tmp_path / "killed", "sqrt").train()
    monkeypatch.undo()
    run, cot = _metagradient(replay, model, queries, tmp_path / "killed", "sqrt")
    ref_final, _ = MagicRun(replay, tmp_path / "sqrt", "sqrt").train()
    again, _ = run.train()
    for k, v in ref_final.params.items():
        torch.testing.assert_close(again.params[k], v, rtol=1e-9, atol=1e-10)  # BLAS rounding

    # the reverse pass killed after its first segment resumes from its saved progress
    progress = tmp_path / "killed" / "progress.safetensors"
    run.save_every_s = 0.0
    calls["n"] = 0
    original_back = MagicRun._step_back

    def dies_back(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original_back(self, *a, **kw)

    monkeypatch.setattr(MagicRun, "_step_back", dies_back)
    with pytest.raises(KeyboardInterrupt):
        run.reverse(cot, progress)
    monkeypatch.undo()
    assert progress.is_file()
    np.testing.assert_allclose(run.reverse(cot, progress).token_grads, ref, rtol=1e-10, atol=1e-15)


def test_truncated_reverse_pass_equals_finite_differences_through_the_last_steps(tmp_path):
    """--unroll_steps: the state at T-K is held at its trained value; the weights act after it."""
    model, _docs, queries, replay = _setup(n=16)
    total, first = replay.num_steps, 5  # inside the sqrt schedule's segment [3, 6)

    def truncated_loss(w):
        s = replay.initial_state()
        with torch.no_grad():
            for t in range(total):
                s, _ = replay.step(s, t, replay.ones() if t < first else w)
        return float(query_losses(model, s.params, queries).mean())

    got = {}
    for schedule in ("every", "sqrt", "log"):
        run, cot = _metagradient(replay, model, queries, tmp_path / schedule, schedule)
        got[schedule] = run.reverse(cot, first_step=first).token_grads
    np.testing.assert_allclose(got["sqrt"], got["every"], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got["log"], got["every"], rtol=1e-10, atol=1e-15)
    # the queries' columns truncated together in one pass average to the aggregate column
    together = run.reverse(_per_query_cotangents(run, model, queries), first_step=first).token_grads
    np.testing.assert_allclose(together.mean(1), got["every"], rtol=1e-10, atol=1e-15)
    per_doc = replay.layout.per_document(got["every"][:, None])[:, 0]
    offsets, eps = replay.layout.offsets, 1e-4
    for i in [*np.flatnonzero(per_doc == 0)[:2], *np.flatnonzero(per_doc)[:3]]:
        plus, minus = replay.ones(), replay.ones()
        plus[offsets[i] : offsets[i + 1]] += eps
        minus[offsets[i] : offsets[i + 1]] -= eps
        fd = (truncated_loss(plus) - truncated_loss(minus)) / (2 * eps)
        assert per_doc[i] == pytest.approx(fd, rel=1e-5, abs=1e-9), (i, per_doc[i], fd)
    # documents trained on only before the truncation get exactly zero, the others do not
    assert (per_doc == 0).sum() == 4 and (per_doc != 0).sum() == 12  # steps 5-7 train on 12 of them


@pytest.mark.parametrize(
    ("optimizer", "lr", "batch_size", "floor"),
    [("sgd", 0.5, 4, 0.9), ("adamw", 0.01, 8, 0.85)],
)
def test_predicted_leave_one_out_matches_retraining(tmp_path, optimizer, lr, batch_size, floor):
    from dataclasses import replace

    recipe = replace(
        RECIPE,
        optimizer=optimizer,
        lr=lr,
        max_grad_norm=0.0,
        batch_size=batch_size,
        grad_accumulation=1,
        epochs=4,
    )
    model, docs, queries, replay = _setup(recipe, n=24)
    run, cot = _metagradient(replay, model, queries, tmp_path, "sqrt")
    predicted = -replay.layout.per_document(run.reverse(cot).token_grads[:, None])[:, 0]  # = score
    base = _query_loss(replay, model, queries, replay.ones())
    measured = np.array(
        [
            _query_loss(replay, model, queries, torch.as_tensor(replay.layout.ones_except([i]))) - base
            for i in range(len(docs))
        ]
    )
    c = correlations(measured, predicted)
    # MAGIC's derivative is exact, so what separates prediction and retraining is the
    # second-order remainder of removing a whole document (a quarter or an eighth of its
    # batch's loss) from a run on random tokens. Measured Spearman / Pearson: SGD 0.96 / 0.94,
    # AdamW 0.92 / 0.88 (Adam's normalised steps respond less linearly); the floors leave a
    # margin for BLAS differences between machines.
    assert c["spearman"] > floor and c["pearson"] > floor - 0.05, c


def test_recipe_pieces_follow_their_definitions():
    rec = TrainingConfig(lr=1.0, warmup_steps=4, schedule="linear")
    assert [learning_rate(rec, t, 12) for t in (0, 2, 4, 8, 12)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    cos = TrainingConfig(lr=2.0, warmup_steps=0, schedule="cosine")
    assert learning_rate(cos, 5, 10) == pytest.approx(1.0)
    plan = plan_steps(10, TrainingConfig(batch_size=3, grad_accumulation=2, epochs=2, seed=3))
    assert [len(s) for s in plan] == [2, 2, 2, 2]
    assert sorted(np.concatenate([m for s in plan[:2] for m in s]).tolist()) == list(range(10))
    again = plan_steps(10, TrainingConfig(batch_size=3, grad_accumulation=2, epochs=2, seed=3))
    assert all(np.array_equal(a, b) for s1, s2 in zip(plan, again) for a, b in zip(s1, s2))
    with pytest.raises(BergsonError, match="batch_size"):
        plan_steps(10, TrainingConfig(batch_size=0))
    model = tiny_gpt2(vocab=24, hidden=8, layers=1)
    docs = random_docs(4, 24)
    frozen = Replay(model, docs, TrainingConfig(freeze=["transformer.wte.*"]), progress=False)
    assert "transformer.wte.weight" not in frozen.names and "lm_head.weight" in frozen.names
    with pytest.raises(BergsonError, match=r"--training\.freeze 'nothing'"):
        Replay(model, docs, TrainingConfig(freeze=["nothing"]), progress=False)
    for bad, option in (
        (dict(lr=0.0), "lr"),
        (dict(beta2=1.0), "beta2"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(warmup_steps=-2), "warmup_steps"),
    ):
        with pytest.raises(BergsonError, match=rf"--training\.{option} "):
            Replay(model, docs, TrainingConfig(**bad), progress=False)


def test_half_precision_is_refused_unless_forced():
    model = tiny_gpt2(dtype=torch.bfloat16)
    with pytest.raises(BergsonError, match="--precision fp32"):
        check_precision(model, force=False)
    check_precision(model, force=True)
    check_precision(tiny_gpt2(dtype=torch.float32), force=False)


def test_attention_without_double_backward_is_replaced():
    from bergson.methods.magic.replay import use_double_backward_attention

    model = tiny_gpt2(dtype=torch.float32)
    model.config._attn_implementation = "flash_attention_2"  # as loaded for a CUDA run
    use_double_backward_attention(model)
    assert model.config._attn_implementation == "sdpa"
    use_double_backward_attention(model)  # eager and sdpa are kept
    assert model.config._attn_implementation == "sdpa"


def test_validation_helpers():
    np.testing.assert_array_equal(rank(np.array([3.0, 1.0, 2.0, 2.0])), [3.0, 0.0, 1.5, 1.5])
    subsets = draw_subsets(100, "leave_k_out", 0.05, 4, 0)
    assert [len(s) for s in subsets] == [5] * 4 and len({tuple(s) for s in subsets}) == 4
    assert len(draw_subsets(100, "lds", 0.05, 3, 0)[0]) == 50
    x, y = np.arange(5.0), np.arange(5.0) ** 3
    assert correlations(x, y) == pytest.approx({"pearson": np.corrcoef(x, y)[0, 1], "spearman": 1.0})
    assert np.isnan(correlations(x, np.ones(5))["spearman"])  # a constant prediction has no correlation
    with pytest.raises(BergsonError, match="--num_subsets"):
        draw_subsets(10, "lds", 0.5, 1, 0)


def test_magic_and_validate_from_the_shell(tmp_path, model_dir, corpus_file):
    import yaml

    from bergson import load_gradients
    from tests.helpers.cli import run

    cfg = {
        "run_path": str(tmp_path / "run"),
        "model": str(model_dir),
        "precision": "fp32",
        "data": {"dataset": str(corpus_file), "split": "train[:12]", "truncation": True, "max_length": 24},
        "query": {"dataset": str(corpus_file), "split": "train[20:22]", "truncation": True, "max_length": 24},
        "training": {"lr": 0.01, "batch_size": 4, "epochs": 2, "schedule": "linear", "warmup_steps": 1},
        "query_mode": "individual",
        "per_token": True,
        "checkpoints": "log",
    }
    path = tmp_path / "magic.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run("magic", str(path), "--top_k", "2")
    assert "column 1:" in proc.stdout
    store = load_gradients(tmp_path / "run" / "scores")
    assert store["scores"].shape == (12, 2) and store.manifest.score["kind"] == "magic"
    assert store.has_tokens
    for i in range(12):
        tokens = store.token_rows(i)
        assert len(tokens) == store.rows["num_tokens"][i] > 0
        np.testing.assert_allclose(tokens.sum(0), store["scores"][i], rtol=1e-5, atol=1e-7)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    assert timings["steps"] == 6 and timings["reverse_0-1_columns"] == 2  # both columns in one pass
    # rerunning finds everything done; another recipe at the same path needs --overwrite
    assert run("magic", str(path)).returncode == 0
    bad = run("magic", str(path), "--training.lr", "0.5", check=False)
    assert bad.returncode != 0 and "--overwrite" in bad.stderr and "Traceback" not in bad.stderr

    out = run(
        "validate", str(tmp_path / "val"), "--recipe", str(tmp_path / "run"), "--scores",
        str(tmp_path / "run" / "scores"), "--fraction", "0.2", "--num_subsets", "4",
    )  # fmt: skip
    assert "magic" in out.stdout
    report = json.loads((tmp_path / "val" / "validation.json").read_text())
    entry = report["stores"][str(tmp_path / "run" / "scores")]
    assert len(entry["per_query"]) == 2 and report["removed_per_subset"] == 2
    cached = sorted((tmp_path / "run" / "retrains").rglob("*.json"))
    assert len(cached) == 1 + 4 + 1  # baseline, 4 subsets, recipe.json
    lds = run("validate", str(tmp_path / "lds"), "--recipe", str(tmp_path / "run"), "--scores",
              str(tmp_path / "run" / "scores"), "--protocol", "lds", "--num_subsets", "3")  # fmt: skip
    assert "lds: 3 retrains without 6 of 12 documents" in lds.stdout
    assert len(sorted((tmp_path / "run" / "retrains").rglob("*.json"))) == 1 + 4 + 1 + 3  # baseline reused
    # a store over other documents is refused with its name
    bad = run(
        "validate",
        str(tmp_path / "v2"),
        "--recipe",
        str(tmp_path / "run"),
        "--scores",
        str(tmp_path / "nowhere"),
        check=False,
    )
    assert bad.returncode != 0 and "nowhere" in bad.stderr


def test_magic_deletes_what_a_resume_no_longer_needs(tmp_path, model_dir, corpus_file, monkeypatch):
    """A pass's progress file (a state-sized cotangent per column it carries) goes once its
    columns are done; states/ and reverse/ go once the scores are written. A run killed inside
    a pass carrying both columns resumes to the scores of one pass per column, and a finished
    one trains nothing again."""
    from bergson import magic
    from bergson.config import DataConfig, MagicConfig
    from bergson.core.files import disk_bytes
    from bergson.methods.magic import reverse

    monkeypatch.setattr(reverse, "SAVE_EVERY_S", 0.0)  # save progress after every segment

    def cfg(name, **kw):
        return MagicConfig(
            run_path=str(tmp_path / name),
            model=str(model_dir),
            precision="fp32",
            data=DataConfig(dataset=str(corpus_file), split="train[:8]", truncation=True, max_length=12),
            query=DataConfig(dataset=str(corpus_file), split="train[20:22]", truncation=True, max_length=12),
            training=TrainingConfig(lr=0.01, batch_size=4, epochs=1, schedule="linear", warmup_steps=1),
            query_mode="individual",
            checkpoints="every",  # 2 steps: segments [1, 2] then [0, 1], progress saved between
            **kw,
        )

    reference = magic(cfg("reference", query_batch_size=1))  # one pass per column
    root = tmp_path / "killed"
    calls = {"n": 0}
    original = MagicRun._step_back

    def dies(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first segment's progress was saved
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(MagicRun, "_step_back", dies)
    with pytest.raises(KeyboardInterrupt):
        magic(cfg("killed"))
    monkeypatch.setattr(MagicRun, "_step_back", original)
    reverse_dir = root / "reverse"
    assert not list(reverse_dir.glob("column_*.done.npy"))
    progress = reverse_dir / "columns_0-1.progress.safetensors"
    timings = json.loads((root / "timings.json").read_text())
    state_bytes = timings["states_bytes"] / len(list((root / "states").glob("step_*.safetensors")))
    # the progress file holds a cotangent of the whole state (params and Adam's slots) per column
    assert 1.9 * state_bytes < progress.stat().st_size < 2.2 * state_bytes
    assert timings["states_bytes"] == disk_bytes(root / "states") > 0

    scores = magic(cfg("killed"))
    np.testing.assert_allclose(scores["scores"], reference["scores"], rtol=1e-5, atol=1e-8)
    assert sorted(p.name for p in root.iterdir()) == [
        "magic.yaml",
        "model",
        "scores",
        "timings.json",
        "trainer",
    ]
    timings = json.loads((root / "timings.json").read_text())
    assert {k for k in timings if k.startswith("deleted_")} == {
        "deleted_reverse_0-1_progress_bytes", "deleted_states_bytes", "deleted_reverse_bytes",
    }  # fmt: skip
    assert timings["deleted_states_bytes"] == timings["states_bytes"]
    assert all(isinstance(v, (int, float)) for v in timings.values())  # flat, as benchmarks read it
    assert timings["scores_bytes"] == disk_bytes(root / "scores") > 0
    assert timings["model_bytes"] == disk_bytes(root / "model") > 0
    assert 0 <= disk_bytes(root) - timings["run_bytes"] < 200  # timings.json grew by the record

    def trains(*a, **kw):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(Replay, "step", trains)
    np.testing.assert_array_equal(magic(cfg("killed"))["scores"], scores["scores"])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_saved_optimizer_state_continues_training_as_torch_would(optimizer, tmp_path):
    """optimizer.pt is torch's own state dict: a torch optimizer loaded from it takes the next
    step exactly as MAGIC's update does; SGD's says it has no second moments, and
    --optimizer_state refuses it."""
    from dataclasses import replace

    from bergson.methods.magic.recipe import optimizer_update
    from bergson.methods.magic.training_state import optimizer_info, optimizer_state_dict
    from bergson.models import find_tracked_modules
    from bergson.transforms.optimizer_state import normalizers_from_optimizer_state

    recipe = replace(RECIPE, optimizer=optimizer, momentum=0.9, lr=0.05, max_grad_norm=0.0)
    model, _, _, replay = _setup(recipe, n=8)
    state = replay.initial_state()
    for t in range(3):
        state, _ = replay.step(state, t, replay.ones())
    grads = {k: torch.randn_like(v) for k, v in state.params.items()}
    expected = optimizer_update(recipe, state, grads, 3, 0.01)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in state.params.items()}
    if optimizer == "adamw":
        opt = torch.optim.AdamW(
            list(params.values()), lr=0.01, betas=(recipe.beta1, recipe.beta2), eps=recipe.eps,
            weight_decay=recipe.weight_decay,
        )  # fmt: skip
    else:
        opt = torch.optim.SGD(list(params.values()), lr=0.01, momentum=0.9, weight_decay=recipe.weight_decay)
    saved = optimizer_state_dict(recipe, state, 3)
    opt.load_state_dict(saved)
    for group in opt.param_groups:
        group["lr"] = 0.01
    for k, p in params.items():
        p.grad = grads[k]
    opt.step()
    for k, p in params.items():
        torch.testing.assert_close(p.detach(), expected.params[k], rtol=1e-12, atol=1e-14)
    assert saved["param_groups"][0]["param_names"] == list(state.params)
    assert optimizer_info(recipe, 3)["second_moments"] is (optimizer == "adamw")
    torch.save(saved, tmp_path / "optimizer.pt")
    modules = find_tracked_modules(model)
    if optimizer == "adamw":
        assert set(normalizers_from_optimizer_state(tmp_path, model, modules)) == set(modules)
    else:
        with pytest.raises(BergsonError, match="unsupported optimizer state"):
            normalizers_from_optimizer_state(tmp_path, model, modules)


def test_magic_writes_its_training_state(tmp_path, model_dir, corpus_file, caplog):
    """model/optimizer.pt, trainer/trainer_state.json and trainer/checkpoint-<k>/ against the
    replay; the scores are bit-identical to a run that saves no checkpoints; a build with
    --optimizer_state RUN/model runs and equals one given the in-memory state's normalizers."""
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import TrainerState

    from bergson import IndexConfig, build, magic
    from bergson.config import DataConfig, MagicConfig
    from bergson.methods.magic.command import prepare
    from bergson.methods.magic.replay import math_attention
    from bergson.models import find_tracked_modules
    from bergson.transforms.normalizers import AdamNormalizer
    from bergson.transforms.optimizer_state import normalizers_from_optimizer_state

    data = DataConfig(dataset=str(corpus_file), split="train[:6]", truncation=True, max_length=8)
    recipe = TrainingConfig(lr=0.01, batch_size=2, epochs=1, schedule="linear", warmup_steps=1)

    def cfg(name, n):
        return MagicConfig(
            run_path=str(tmp_path / name), model=str(model_dir), precision="fp32", data=data,
            query=DataConfig(dataset=str(corpus_file), split="train[20:21]", truncation=True, max_length=8),
            training=recipe, checkpoints="every", save_checkpoints=n,
        )  # fmt: skip

    scores = magic(cfg("run", 2))
    np.testing.assert_array_equal(scores["scores"], magic(cfg("plain", 0))["scores"])
    root = tmp_path / "run"
    model, _, docs, _ = prepare(cfg("run", 2))
    replay = Replay(model, docs, recipe, progress=False)
    states, losses = [replay.initial_state()], []
    with math_attention():  # the kernel MAGIC trains with
        for t in range(replay.num_steps):
            s, loss = replay.step(states[-1], t, replay.ones())
            states.append(s)
            losses.append(loss)
    assert replay.num_steps == 3
    assert sorted(p.name for p in (root / "trainer").iterdir()) == [
        "checkpoint-2", "checkpoint-3", "trainer_state.json",
    ]  # fmt: skip
    ts = json.loads((root / "trainer" / "trainer_state.json").read_text())
    assert ts["global_step"] == ts["max_steps"] == 3
    assert [e["step"] for e in ts["log_history"]] == [1, 2, 3]
    lrs = [e["learning_rate"] for e in ts["log_history"]]
    assert lrs == [learning_rate(recipe, t, 3) for t in range(3)]
    assert lrs == pytest.approx([0.0, 0.01, 0.005], rel=1e-12)  # warmup 1, then linear to 0 at 3
    np.testing.assert_allclose([e["loss"] for e in ts["log_history"]], losses, rtol=1e-6)
    hf = TrainerState.load_from_json(str(root / "trainer" / "trainer_state.json"))
    assert hf.global_step == 3 and len(hf.log_history) == 3
    half = json.loads((root / "trainer" / "checkpoint-2" / "trainer_state.json").read_text())
    assert half["global_step"] == 2 and len(half["log_history"]) == 2

    modules = find_tracked_modules(model)
    for where, step in ((root / "trainer" / "checkpoint-2", 2), (root / "model", 3)):
        saved = dict(AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).named_parameters())
        for k, v in states[step].params.items():
            torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
        norms = normalizers_from_optimizer_state(where, model, modules)
        names = dict(model.named_modules())
        param_of = {id(p): n for n, p in model.named_parameters()}
        for name, norm in norms.items():
            key = param_of[id(names[name].weight)]
            assert isinstance(norm, AdamNormalizer)
            v_hat = states[step].slots["v"][key] / (1 - recipe.beta2**step)
            torch.testing.assert_close(norm.weight, v_hat, rtol=1e-6, atol=1e-12)
        info = json.loads((where / "optimizer.json").read_text())
        assert info["step"] == step and info["second_moments"] is True

    index = dict(model=str(root / "model"), precision="fp32", data=data, projection_dim=4)
    from_file = build(
        IndexConfig(run_path=str(tmp_path / "opt"), optimizer_state=str(root / "model"), **index)
    )
    final = states[-1]
    given = {
        name: AdamNormalizer(
            weight=final.slots["v"][param_of[id(names[name].weight)]] / (1 - recipe.beta2**3), eps=recipe.eps
        )
        for name in modules
    }
    in_memory = build(IndexConfig(run_path=str(tmp_path / "mem"), **index), normalizers=given)
    plain = build(IndexConfig(run_path=str(tmp_path / "none"), **index))
    np.testing.assert_allclose(np.asarray(from_file.all), np.asarray(in_memory.all), rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(from_file.all), np.asarray(plain.all), rtol=1e-2)

    # `bergson source --segments RUN/trainer` reads the run as a Trainer output directory: step 3's
    # middle (2.5) ties between the checkpoints and goes to the earlier, so checkpoint-2 stands for
    # all three steps (rates 0 + 0.01 + 0.005) and checkpoint-3 for none
    from bergson import SourceConfig, source

    traced = source(SourceConfig(run_path=str(tmp_path / "source"), segments=[str(root / "trainer")], data=data,
                                 query=cfg("run", 2).query, precision="fp32", device="cpu"))  # fmt: skip
    segments = traced.manifest.score["segments"]
    assert [s["checkpoint"] for s in segments] == [str(root / "trainer" / f"checkpoint-{k}") for k in (2, 3)]
    assert [s["learning_rate_sum"] for s in segments] == pytest.approx([0.015, 0.0])
    assert "adam" in traced.manifest.score["stages"][0]["optimizer"]
    values = np.asarray(traced["scores"], np.float64)
    assert np.isfinite(values).all() and np.abs(values).max() > 0


def test_save_checkpoints_is_refused_beyond_the_steps(tmp_path, model_dir, corpus_file):
    from bergson import magic
    from bergson.config import DataConfig, MagicConfig

    data = DataConfig(dataset=str(corpus_file), split="train[:4]", truncation=True, max_length=12)
    with pytest.raises(BergsonError, match="--save_checkpoints 3: the recipe trains 2 optimizer steps"):
        magic(MagicConfig(
            run_path=str(tmp_path / "r"), model=str(model_dir), precision="fp32", data=data, query=data,
            training=TrainingConfig(batch_size=2), save_checkpoints=3,
        ))  # fmt: skip


class _ReplayRetrainer:
    """What ``top_k_removals`` reads of a Retrainer, over an in-memory replay (no cache)."""

    def __init__(self, replay, model, queries):
        self.replay, self.model, self.queries, self.docs = replay, model, queries, replay.docs
        self.dir = "memory"
        self.cache = {}

    def query_losses(self, removed):
        key = tuple(sorted(int(i) for i in removed))
        if key not in self.cache:
            state, _ = self.replay.run(torch.as_tensor(self.replay.layout.ones_except(key)))
            self.cache[key] = query_losses(self.model, state.params, self.queries).detach().numpy()
        return self.cache[key]


def test_removing_the_top_k_proponents_raises_the_loss_more_than_random_removals(tmp_path):
    """The top_k protocol against real retraining: removing each query's top-k documents by
    MAGIC's scores raises its loss more than random removals of as many; the same scores with
    the sign flipped (which remove the opponents) do the opposite."""
    from dataclasses import replace

    from bergson.validation import markdown, top_k_removals

    recipe = replace(RECIPE, optimizer="sgd", lr=0.5, max_grad_norm=0.0, batch_size=4, grad_accumulation=1)
    model, _, queries, replay = _setup(recipe, n=16)
    run = MagicRun(replay, tmp_path, "sqrt")
    final, _ = run.train()
    columns = []
    for q in range(len(queries)):
        params = {k: v.detach().requires_grad_(True) for k, v in final.params.items()}
        loss = query_losses(model, params, queries.select(np.array([q]))).mean()
        cot = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        columns.append(-replay.layout.per_document(run.reverse(cot).token_grads[:, None])[:, 0])
    scores = np.stack(columns, 1)  # [documents, queries], positive: lowers the query's loss
    retrainer = _ReplayRetrainer(replay, model, queries)
    report = top_k_removals(retrainer, {"magic": scores, "flipped": -scores}, [3], 4, 0)
    magic_k, flipped_k = report["stores"]["magic"]["top_k"]["3"], report["stores"]["flipped"]["top_k"]["3"]
    for q in range(len(queries)):
        top = magic_k["queries"][q]
        assert top["removed"] == sorted(np.argsort(-scores[:, q])[:3].tolist())
        assert top["loss_change"] > 0 and top["difference"] > 0 and top["z"] > 0, top
        assert flipped_k["queries"][q]["difference"] < 0, flipped_k["queries"][q]
        assert top["random_mean"] == flipped_k["queries"][q]["random_mean"]  # shared random retrains
    assert magic_k["share_beating_random"] == 1.0 and flipped_k["share_beating_random"] == 0.0
    # the random baseline is the mean of real retrains without 3 random documents
    rng = np.random.default_rng([0, 3])
    draws = [np.sort(rng.choice(16, size=3, replace=False)) for _ in range(4)]
    base = retrainer.query_losses([])
    expected = np.mean([retrainer.query_losses(d) - base for d in draws], 0)
    np.testing.assert_allclose(report["random"]["3"]["mean"], expected, rtol=1e-9)
    table = markdown(report)
    assert table.count("| magic | scores | 3 |") == len(queries) and "random Δ (mean ± std)" in table
