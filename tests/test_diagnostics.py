"""``bergson test_model_configuration``: batched against one-by-one gradients, and the escalation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import bergson.diagnostics as diagnostics
from bergson import BergsonError, ModelConfigTestConfig, load_model
from bergson.config import ModelOptions
from bergson.models import numerics
from tests.helpers.assets import ASSETS

MODEL = str(ASSETS / "tiny-pythia")


@pytest.fixture(autouse=True)
def one_thread():
    """Dozens of tiny forward passes: on a busy 2-core machine two spinning threads are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**kwargs) -> ModelConfigTestConfig:
    defaults = dict(model=MODEL, device="cpu", precision="fp32", num_documents=4, projection_dim=4)
    return ModelConfigTestConfig(**{**defaults, **kwargs})  # type: ignore[arg-type]


def batch_dependent_loader(when=lambda: True):
    """load_model, plus a forward hook on the input embeddings that adds 1e-2 * (batch size - 1)
    times a fixed ramp (not a constant, which layer norms remove) to every hidden state while
    ``when()`` holds: a document's gradient then depends on its batch."""

    def loader(opts: ModelOptions):
        model, tokenizer = load_model(opts)

        def hook(module, inputs, output):
            if not when():
                return output
            ramp = torch.linspace(-1.0, 1.0, output.shape[-1], dtype=output.dtype, device=output.device)
            return output + 1e-2 * (output.shape[0] - 1) * ramp

        model.get_input_embeddings().register_forward_hook(hook)
        return model, tokenizer

    return loader


def test_tiny_model_is_consistent_as_configured(tmp_path):
    out = tmp_path / "report.json"
    report = diagnostics.test_model_configuration(config(output=str(out)))
    assert report["consistent"] and report["consistent_as_configured"]
    assert report["message"] == "consistent with the current settings"
    assert report["flags"] == []
    (first, *rest) = report["settings"]
    assert first["status"] == "tested" and first["dtype"] == "float32"
    assert first["padded_max_rel_error"] < 1e-5 and first["equal_length_max_rel_error"] < 1e-5
    assert len(first["padded_rel_errors"]) == report["num_documents"] == 4
    assert len(set(report["lengths"])) > 1  # the padded batch mixes lengths
    assert report["common_length"] == min(report["lengths"])
    assert all("status" not in s for s in rest)  # stopped at the first setting
    assert json.loads(out.read_text()) == report


def test_batch_dependent_model_is_flagged():
    report = diagnostics.test_model_configuration(config(), loader=batch_dependent_loader())
    assert not report["consistent"] and report["recommended"] is None
    assert report["message"].startswith("not consistent under any setting tried")
    status = {s["name"]: s for s in report["settings"]}
    assert status["as configured"]["status"] == "tested"
    assert not status["as configured"]["consistent"]
    assert status["as configured"]["padded_max_rel_error"] > 1e-3
    assert status["as configured"]["equal_length_max_rel_error"] > 1e-3
    assert status["+ math SDPA"]["status"] == "tested" and not status["+ math SDPA"]["consistent"]
    assert status["+ fp32, TF32 matmuls"]["status"] == "skipped"  # CUDA only
    assert "CUDA" in status["+ fp32, TF32 matmuls"]["note"]
    assert status["full fp32 + math SDPA"]["status"] == "skipped"  # same numerics as '+ math SDPA'


def test_escalation_recommends_the_flag_that_fixes_it():
    # batch dependence only while the flash / memory-efficient kernels are enabled
    loader = batch_dependent_loader(when=torch.backends.cuda.flash_sdp_enabled)
    report = diagnostics.test_model_configuration(config(), loader=loader)
    assert report["consistent"] and not report["consistent_as_configured"]
    assert report["recommended"] == {"precision": "fp32", "force_math_sdp": True, "use_tf32_matmuls": False}
    assert report["message"] == "pass these flags to build and score: --force_math_sdp"
    text = diagnostics.format_report(report)
    assert "inconsistent" in text and text.endswith(report["message"])


def test_document_vectors_are_those_of_one_collection_per_situation():
    """The check's two passes give, bit for bit, the vectors of one collect_gradients call per
    situation (each document alone, the padded batch, each cut document alone, the equal-length
    batch), and run the model once per batch: a document already at the common length is not
    run alone twice."""
    from bergson.collect.loop import collect_gradients
    from bergson.models import find_tracked_modules

    cfg = config(num_documents=5)
    model, tokenizer = load_model(cfg)
    docs = diagnostics.load_test_documents(cfg, tokenizer, model)
    common = int(docs.lengths.min())
    # two documents at the common length, three longer ones of mixed lengths
    docs = diagnostics._truncate(docs, [common, *[int(n) for n in docs.lengths[1:4]], common])
    assert (docs.lengths == common).sum() == 2 and len(set(docs.lengths.tolist())) > 2
    tracked = find_tracked_modules(model)

    def one_batch(d):
        budget = max(2, int(d.lengths.max()) * len(d))
        return collect_gradients(
            model, d, modules=tracked, projection_dim=4, token_batch_size=budget, progress=False
        ).vectors

    def each_alone(d):
        return np.concatenate([one_batch(diagnostics._select(d, [i])) for i in range(len(d))])

    equal = diagnostics._truncate(docs, common)
    expected = {
        "alone": each_alone(docs),
        "padded": one_batch(docs),
        "equal_alone": each_alone(equal),
        "equal": one_batch(equal),
    }

    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        got = diagnostics.document_vectors(model, docs, projection_dim=4)
    finally:
        handle.remove()
    assert got.common_length == common
    for key, want in expected.items():
        np.testing.assert_array_equal(getattr(got, key), want, err_msg=key)
    assert np.abs(expected["padded"]).max() > 0
    assert len(calls) == 2 + len(docs) + 3  # the two batches, 5 documents alone, 3 of them cut


def test_flags_for_precision_and_tf32():
    cfg = ModelOptions(precision="bf16", use_tf32_matmuls=True)
    fp32 = diagnostics.Setting("x", "fp32", True, False)
    assert diagnostics.flags_for(fp32, cfg) == [
        "--force_math_sdp",
        "--precision",
        "fp32",
        "--no_use_tf32_matmuls",
    ]


def test_numerics_applies_and_restores():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with numerics(ModelOptions(force_math_sdp=True, use_tf32_matmuls=True)):
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.flash_sdp_enabled()
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with numerics(ModelOptions()):
        assert torch.backends.cuda.flash_sdp_enabled()
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize(
    ("change", "option"),
    [({"num_documents": 1}, "--num_documents"), ({"tolerance": 0.0}, "--tolerance")],
)
def test_bad_options(change, option):
    with pytest.raises(BergsonError, match=option):
        diagnostics.test_model_configuration(replace(config(), **change))


def test_cli_inconsistent_exits_non_zero(monkeypatch, capsys):
    from bergson.cli import main

    real = diagnostics.test_model_configuration
    monkeypatch.setattr(
        diagnostics, "test_model_configuration", lambda cfg: real(cfg, loader=batch_dependent_loader())
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["test_model_configuration", "--model", MODEL, "--device", "cpu", "--num_documents", "2"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "inconsistent" in out
    assert "error: not consistent under any setting tried" in err and "Traceback" not in err


def cli(*args: str) -> subprocess.CompletedProcess:
    # one thread, as in-process (see one_thread)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bergson", "test_model_configuration", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_consistent():
    proc = cli("--model", MODEL, "--device", "cpu", "--num_documents", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "consistent with the current settings"
    assert "as configured" in proc.stdout


def test_cli_bad_input():
    proc = cli("--model", MODEL, "--device", "cpu", "--num_documents", "0")
    assert proc.returncode == 1
    assert "--num_documents 0: must be >= 2" in proc.stderr
    assert "Traceback" not in proc.stderr
