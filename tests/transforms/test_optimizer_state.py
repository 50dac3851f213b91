"""Normalizers read from optimizer state: checked against the optimizer's own state tensors,
looked up by parameter object (never by index), so the index-to-name mapping is what is tested."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bergson.core.layout import module_shape
from bergson.errors import BergsonError
from bergson.models import find_tracked_modules
from bergson.transforms.normalizers import AdafactorNormalizer, AdamNormalizer
from bergson.transforms.optimizer_state import normalizers_from_optimizer_state
from tests.helpers.assets import tiny_gpt2, tiny_neox

VOCAB = 64


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2, seed: int = 0) -> None:
    """A few optimizer steps on random tokens."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _save(opt: torch.optim.Optimizer, tmp_path: Path) -> Path:
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    return path


def _adam_v(opt: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """Bias-corrected second moment of ``param`` from the live optimizer (by object)."""
    state = opt.state[param]
    beta2 = opt.param_groups[0]["betas"][1]
    step = float(state["step"])
    return state["exp_avg_sq"] / (1 - beta2**step)


def _hf_adafactor_v(opt, param: torch.Tensor) -> torch.Tensor:
    """HF Adafactor's estimate v_ij = row_i col_j / mean(row), in the parameter's stored layout."""
    state = opt.state[param]
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    return torch.outer(row, col) / row.mean()


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    assert b is None or isinstance(b, torch.Tensor)
    return b


def _check_adam(norms, modules, v, transpose: bool = False, include_bias: bool = True) -> None:
    """Every module's AdamNormalizer equals ``v(param)`` for its weight (and bias, if any)."""
    assert set(norms) == set(modules)
    for name, module in modules.items():
        norm = norms[name]
        assert isinstance(norm, AdamNormalizer), name
        expected = v(_weight(module))
        _close(norm.weight, expected.T if transpose else expected)
        bias = _bias(module)
        if include_bias and bias is not None:
            assert norm.bias is not None, name
            _close(norm.bias, v(bias))
        else:
            assert norm.bias is None, name


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=0.0)


def _trainer(tmp_path: Path, optim: str):
    from transformers import Trainer, TrainingArguments

    model = tiny_neox(vocab=VOCAB, dtype=torch.float32).train()
    g = torch.Generator().manual_seed(0)
    data: Any = []
    for _ in range(6):
        ids = torch.randint(0, VOCAB, (8,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        save_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        optim=optim,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file()
    return trainer, model, ckpt


# ---------------------------------------------------------------------------------------------
# 1-2. Hugging Face Trainer checkpoints


def test_trainer_adamw_checkpoint(tmp_path):
    trainer, model, ckpt = _trainer(tmp_path, "adamw_torch")
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    assert len(sizes) == 2 and all(sizes), sizes  # decay and no-decay groups, both non-empty
    assert "param_names" not in saved["param_groups"][0]  # so the grouping must be reconstructed

    modules = find_tracked_modules(model)
    assert sum(_bias(m) is not None for m in modules.values()) >= 8
    norms = normalizers_from_optimizer_state(ckpt, model, modules, include_bias=True)
    opt: Any = trainer.optimizer
    beta2 = trainer.args.adam_beta2

    def v(param: torch.Tensor) -> torch.Tensor:
        state = opt.state[param]
        return state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))

    _check_adam(norms, modules, v)
    assert all(n.eps == trainer.args.adam_epsilon for n in norms.values())

    # the file path itself works too, and without include_bias there is no bias moment
    plain = normalizers_from_optimizer_state(ckpt / "optimizer.pt", model, modules)
    _check_adam(plain, modules, v, include_bias=False)


def test_trainer_hf_adafactor_checkpoint(tmp_path):
    trainer, model, ckpt = _trainer(tmp_path, "adafactor")
    modules = find_tracked_modules(model)
    opt: Any = trainer.optimizer
    norms = normalizers_from_optimizer_state(ckpt, model, modules, include_bias=True)
    dense = normalizers_from_optimizer_state(ckpt, model, modules, form="adam", include_bias=True)
    for name, module in modules.items():
        norm = norms[name]
        assert isinstance(norm, AdafactorNormalizer), name
        state = opt.state[_weight(module)]
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        expected = torch.outer(row, col) / row.mean()
        _close(norm.dense(), expected)

        adam = dense[name]  # form="adam": the dense estimate, and the bias moment exactly
        assert isinstance(adam, AdamNormalizer)
        _close(adam.weight, expected)

        bias = _bias(module)
        if bias is None:
            assert norm.bias_col is None and adam.bias is None
            continue
        # bias: the documented ratio-of-means fit v_b,i ≈ row_i * sum(v_b) / sum(row)
        v_b = opt.state[bias]["exp_avg_sq"]
        with_bias = norm.dense(include_bias=True)
        _close(with_bias[:, :-1], expected)
        _close(with_bias[:, -1], row * v_b.sum() / row.sum())
        assert adam.bias is not None
        _close(adam.bias, v_b)


# ---------------------------------------------------------------------------------------------
# 3-4. Plain torch optimizers


def test_torch_adamw_positional(tmp_path):
    model = tiny_neox(vocab=VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    path = _save(opt, tmp_path)
    modules = find_tracked_modules(model)
    norms = normalizers_from_optimizer_state(path, model, modules, include_bias=True)
    _check_adam(norms, modules, lambda p: _adam_v(opt, p))


def test_torch_adamw_param_names(tmp_path):
    """Named parameters in a non-standard order: only the stored param_names can map them."""
    model = tiny_neox(vocab=VOCAB)
    named = list(model.named_parameters())[::-1]
    opt = torch.optim.AdamW(named, lr=1e-2)
    _train(model, opt)
    path = _save(opt, tmp_path)
    assert "param_names" in torch.load(path, weights_only=True)["param_groups"][0]
    modules = find_tracked_modules(model)
    norms = normalizers_from_optimizer_state(path, model, modules, include_bias=True)
    _check_adam(norms, modules, lambda p: _adam_v(opt, p))


def test_rank_one_form_is_row_and_column_sums(tmp_path):
    model = tiny_neox(vocab=VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    path = _save(opt, tmp_path)
    modules = find_tracked_modules(model)
    norms = normalizers_from_optimizer_state(path, model, modules, form="rank_one")
    with_bias = normalizers_from_optimizer_state(path, model, modules, form="rank_one", include_bias=True)
    for name, module in modules.items():
        norm = norms[name]
        assert isinstance(norm, AdafactorNormalizer)
        v = _adam_v(opt, _weight(module))
        _close(norm.dense(), torch.outer(v.sum(1), v.sum(0)) / v.sum())
        bias = _bias(module)
        if bias is None:
            continue
        # with the bias as an extra column: the same closed form on [v | v_b]
        vb = torch.cat([v, _adam_v(opt, bias)[:, None]], dim=1)
        norm_b = with_bias[name]
        assert isinstance(norm_b, AdafactorNormalizer)
        _close(norm_b.dense(include_bias=True), torch.outer(vb.sum(1), vb.sum(0)) / vb.sum())


def test_torch_adafactor(tmp_path):
    model = tiny_neox(vocab=VOCAB, dtype=torch.float32)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    _train(model, opt)
    path = _save(opt, tmp_path)
    modules = find_tracked_modules(model)
    norms = normalizers_from_optimizer_state(path, model, modules, include_bias=True)
    eps1 = torch.finfo(torch.float32).eps  # eps=(None, ...) means the dtype's machine epsilon
    for name, module in modules.items():
        norm = norms[name]
        assert isinstance(norm, AdafactorNormalizer)
        state = opt.state[_weight(module)]
        row_var, col_var = state["row_var"], state["col_var"]  # (out, 1), (1, in)
        expected = row_var @ col_var / row_var.mean().clamp(min=eps1)
        _close(norm.dense(), expected)
        bias = _bias(module)
        if bias is None:
            continue
        v_b = opt.state[bias]["variance"]
        _close(norm.dense(include_bias=True)[:, -1], row_var[:, 0] * v_b.sum() / row_var.sum())


# ---------------------------------------------------------------------------------------------
# 5. Errors


def test_state_of_another_model_names_the_shape(tmp_path):
    other = tiny_neox(vocab=VOCAB, hidden=32)
    opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    _train(other, opt, steps=1)
    path = _save(opt, tmp_path)
    model = tiny_neox(vocab=VOCAB, hidden=16)
    with pytest.raises(BergsonError, match=r"shape") as info:
        normalizers_from_optimizer_state(path, model, find_tracked_modules(model))
    msg = str(info.value)
    assert "another model" in msg and "gpt_neox.embed_in.weight" in msg and "(64, 16)" in msg


def test_not_an_optimizer_file(tmp_path):
    model = tiny_neox(vocab=VOCAB)
    modules = find_tracked_modules(model)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    with pytest.raises(BergsonError, match="not an optimizer state dict") as info:
        normalizers_from_optimizer_state(weights, model, modules)
    assert str(weights) in str(info.value)

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BergsonError, match="cannot be read") as info:
        normalizers_from_optimizer_state(text, model, modules)
    assert str(text) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    model = tiny_neox(vocab=VOCAB)
    modules = find_tracked_modules(model)
    missing = tmp_path / "nope" / "optimizer.pt"
    with pytest.raises(BergsonError, match="no such file") as info:
        normalizers_from_optimizer_state(missing, model, modules)
    assert str(missing) in str(info.value)
    with pytest.raises(BergsonError, match=r"no optimizer\.pt"):
        normalizers_from_optimizer_state(tmp_path, model, modules)


def test_unknown_form_and_untrained_module(tmp_path):
    model = tiny_neox(vocab=VOCAB)
    frozen = model.get_submodule("gpt_neox.layers.1.mlp.dense_h_to_4h")
    frozen.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, opt, steps=1)
    path = _save(opt, tmp_path)
    modules = find_tracked_modules(model)
    with pytest.raises(BergsonError, match="--normalizer_form"):
        normalizers_from_optimizer_state(path, model, modules, form="dense")
    with pytest.raises(BergsonError, match=r"gpt_neox\.layers\.1\.mlp\.dense_h_to_4h"):
        normalizers_from_optimizer_state(path, model, modules)
    trained = {n: m for n, m in modules.items() if m is not frozen}
    norms = normalizers_from_optimizer_state(path, model, trained)
    assert set(norms) == set(trained)


# ---------------------------------------------------------------------------------------------
# 6. PEFT


def test_peft_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_neox(vocab=VOCAB, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query_key_value"]))
    # make lora_B non-zero so that lora_A gets gradients from the first step on
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, opt)
    path = _save(opt, tmp_path)

    modules = find_tracked_modules(model)
    assert modules and all("lora_" in n for n in modules)
    lora_linears = {n for n, m in model.named_modules() if "lora_" in n and isinstance(m, nn.Linear)}
    assert set(modules) == lora_linears
    norms = normalizers_from_optimizer_state(path, model, modules)
    assert set(norms) == lora_linears
    _check_adam(norms, modules, lambda p: _adam_v(opt, p))

    # an adapter loaded for inference is frozen: the lora_ parameters still map
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = normalizers_from_optimizer_state(path, model, modules)
    _check_adam(frozen, modules, lambda p: _adam_v(opt, p))


# ---------------------------------------------------------------------------------------------
# 7. GPT-2 Conv1D (weights stored in x out)


def _conv1d_modules(model: nn.Module) -> dict[str, nn.Module]:
    modules = find_tracked_modules(model)
    conv = {n: m for n, m in modules.items() if type(m).__name__ == "Conv1D"}
    assert conv
    return conv


def test_gpt2_conv1d_adamw_is_transposed(tmp_path):
    model = tiny_gpt2(vocab=VOCAB, hidden=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    path = _save(opt, tmp_path)
    conv = _conv1d_modules(model)
    norms = normalizers_from_optimizer_state(path, model, conv, include_bias=True)
    _check_adam(norms, conv, lambda p: _adam_v(opt, p), transpose=True)
    for name, module in conv.items():
        norm = norms[name]
        assert isinstance(norm, AdamNormalizer)
        assert tuple(norm.weight.shape) == module_shape(module)  # out x in
    c_attn = norms["transformer.h.0.attn.c_attn"]
    assert isinstance(c_attn, AdamNormalizer) and tuple(c_attn.weight.shape) == (48, 16)


def test_gpt2_conv1d_hf_adafactor_is_transposed(tmp_path):
    from transformers.optimization import Adafactor

    model = tiny_gpt2(vocab=VOCAB, hidden=16, dtype=torch.float32)
    opt = Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False)
    _train(model, opt)
    path = _save(opt, tmp_path)
    norms = normalizers_from_optimizer_state(path, model, _conv1d_modules(model))
    for name, module in _conv1d_modules(model).items():
        norm = norms[name]
        assert isinstance(norm, AdafactorNormalizer)
        assert (norm.row.numel(), norm.col.numel()) == module_shape(module)
        _close(norm.dense(), _hf_adafactor_v(opt, _weight(module)).T)


def test_tied_lm_head_maps_to_the_shared_parameter(tmp_path):
    """GPT-2 ties lm_head to the token embedding: named_parameters() lists it once, as wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, tie_word_embeddings=True
    )
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt)
    path = _save(opt, tmp_path)
    modules = find_tracked_modules(model, include_output_head=True)  # the head is not tracked by default
    norms = normalizers_from_optimizer_state(path, model, modules)
    head = norms["lm_head"]
    assert isinstance(head, AdamNormalizer)
    _close(head.weight, _adam_v(opt, model.lm_head.weight))
