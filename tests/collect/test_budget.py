"""--token_batch_size auto: the GPU probe (exercised with a fake out-of-memory error), the CPU rule,
the option's spellings, and a CPU build with auto equal to an explicit build with the chosen value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bergson.collect.budget import (
    CPU_CAP,
    FLOOR,
    _probe_step,
    auto_token_budget,
    bytes_per_token,
    cpu_token_budget,
    probe_budget,
)
from bergson.errors import BergsonError
from tests.helpers.assets import tiny_neox


def _fake_device(fits_up_to: int):
    """A step that runs out of memory above ``fits_up_to`` tokens, and the budgets it was given."""
    seen: list[int] = []

    def step(budget: int) -> None:
        seen.append(budget)
        if budget > fits_up_to:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")

    return step, seen


def test_probe_halves_on_out_of_memory_until_a_budget_fits():
    step, seen = _fake_device(5000)
    freed = []
    budget, tries = probe_budget(step, start=65536, after_oom=lambda: freed.append(1))
    assert budget == 4096 and seen == [65536, 32768, 16384, 8192, 4096]
    assert [t["fits"] for t in tries] == [False] * 4 + [True] and len(freed) == 4

    # the older spelling of an OOM (a RuntimeError saying so) counts too; other errors propagate
    def old_oom(b: int) -> None:
        if b > 1024:
            raise RuntimeError("CUDA error: out of memory")

    assert probe_budget(old_oom, start=4096)[0] == 1024

    def broken(b: int) -> None:
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        probe_budget(broken)
    with pytest.raises(BergsonError, match="token_batch_size auto"):
        probe_budget(_fake_device(FLOOR - 1)[0], start=4 * FLOOR)


def test_the_probe_step_runs_a_build_step_through_the_fused_head():
    from bergson.collect import head_loss

    model = tiny_neox().eval()
    head_loss._PLAIN.pop(model, None)
    _probe_step(model, None, 4, context=16)(64)  # four random documents of 16 tokens
    assert head_loss._PLAIN[model] is True  # the build's own route to the loss, not the full logits
    assert all(p.grad is None for p in model.parameters())


def test_auto_budget_uses_the_probe_when_given_a_step_and_the_rule_on_cpu():
    model = tiny_neox()
    step, _ = _fake_device(3000)
    budget, record = auto_token_budget(model, step=step)
    assert budget == 2048 and record["chosen"] == 2048 and "probe" in record["method"]
    assert [t["budget"] for t in record["tries"]] == [65536, 32768, 16384, 8192, 4096, 2048]
    # the CPU rule: a quarter of the available memory over the bytes a token costs, a power of two
    per_token = bytes_per_token(model)
    assert cpu_token_budget(model, available=4 * per_token * 3000)[0] == 2048
    assert cpu_token_budget(model, available=1)[0] == FLOOR
    assert cpu_token_budget(model, available=1 << 50)[0] == CPU_CAP
    assert auto_token_budget(model)[1]["method"] == "cpu memory rule"


def test_option_spellings(tmp_path):
    from bergson import IndexConfig
    from bergson.cli import parse
    from bergson.config.io import from_dict
    from bergson.config.options import validate_options

    base = ["build", str(tmp_path / "x"), "--model", "m", "--dataset", "d.jsonl"]
    assert parse("build", [*base[1:], "--token_batch_size", "auto"]).token_batch_size == "auto"
    assert parse("build", [*base[1:], "--token_batch_size", "512"]).token_batch_size == 512
    assert from_dict(IndexConfig, {"token_batch_size": "auto"}).token_batch_size == "auto"
    assert from_dict(IndexConfig, {"token_batch_size": 1024}).token_batch_size == 1024
    cfg = IndexConfig(run_path=str(tmp_path / "y"), model="m", token_batch_size="lots")
    cfg.data.dataset = "d.jsonl"
    with pytest.raises(BergsonError, match="token_batch_size 'lots'"):
        validate_options(cfg)
    cfg.token_batch_size = "1"
    with pytest.raises(BergsonError, match="token_batch_size 1"):
        validate_options(cfg)


def test_auto_build_records_its_choice_and_equals_the_explicit_build(tmp_path, model_dir, corpus_file):
    from bergson import build, load_gradients
    from tests.helpers.stores import make_cfg

    auto = make_cfg(tmp_path, model_dir, corpus_file, "auto", token_batch_size="auto", save_dtype="float32")
    build(auto)
    manifest = json.loads((Path(auto.run_path) / "manifest.json").read_text())
    record = manifest["plan"]["token_batch_size_auto"]
    chosen = record["chosen"]
    assert manifest["plan"]["token_batch_size"] == chosen and record["method"] == "cpu memory rule"
    assert FLOOR <= chosen <= CPU_CAP and chosen & (chosen - 1) == 0
    explicit = make_cfg(
        tmp_path, model_dir, corpus_file, "explicit", token_batch_size=chosen, save_dtype="float32"
    )
    build(explicit)
    a, b = load_gradients(auto.run_path), load_gradients(explicit.run_path)
    np.testing.assert_array_equal(np.asarray(a.all), np.asarray(b.all))
    assert (
        "token_batch_size_auto"
        not in json.loads((Path(explicit.run_path) / "manifest.json").read_text())["plan"]
    )


def test_a_gpu_run_at_the_default_budget_is_told_about_auto():
    from bergson.config import IndexConfig
    from bergson.runs.documents import default_budget_hint

    default = IndexConfig()
    hint = default_budget_hint(default, "cuda")
    assert hint is not None and "--token_batch_size auto" in hint and "2048 (the default)" in hint
    assert default_budget_hint(default, "cpu") is None  # on a CPU a larger budget buys nothing
    assert default_budget_hint(IndexConfig(token_batch_size=4096), "cuda") is None  # chosen by the user
