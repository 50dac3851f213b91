"""TrackStar end to end on the shipped assets: against its definition, resumed after a kill, and from the shell."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bergson import BergsonError, build, trackstar
from bergson.config import DataConfig, IndexConfig, TrackstarConfig
from bergson.data import TokenizedDocs
from bergson.methods.trackstar import _Pipeline
from bergson.runs.documents import subsample
from bergson.store import load_gradients
from bergson.transforms.preconditioners import is_complete, load_preconditioner
from tests.helpers.assets import ASSETS
from tests.helpers.cli import run
from tests.helpers.gradients import explicit_moments, unit

MODEL = ASSETS / "tiny-pythia"
QUERIES = DataConfig(
    dataset=str(ASSETS / "queries.jsonl"),
    prompt_column="prompt",
    completion_column="completion",
    truncation=True,
)


def _cfg(tmp_path, corpus_file, **kw) -> TrackstarConfig:
    return TrackstarConfig(
        run_path=str(tmp_path / "ts"),
        model=str(MODEL),
        precision="fp32",
        data=DataConfig(dataset=str(corpus_file), truncation=True, max_length=64),
        query=QUERIES,
        token_batch_size=512,
        projection_dim=4,
        stats_documents=12,
        downweight_components=3,
        **kw,
    )


def _moments_of_rows(v: np.ndarray, modules) -> dict[str, np.ndarray]:
    v = v[np.abs(v).max(1) > 0]
    return {
        m.name: v[:, m.offset : m.offset + m.dim].T @ v[:, m.offset : m.offset + m.dim] / len(v)
        for m in modules
    }


def test_trackstar_matches_its_definition_and_resumes(tmp_path, corpus_file, monkeypatch):
    cfg = _cfg(tmp_path, corpus_file)
    root = tmp_path / "ts"

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(_Pipeline, "scores", killed)
    with pytest.raises(KeyboardInterrupt):
        trackstar(cfg)
    assert is_complete(root / "mixed") and not (root / "summary.md").exists()
    stamps = {
        p: (root / p).stat().st_mtime_ns for p in ("train_stats/preconditioner.json", "query/manifest.json")
    }
    monkeypatch.undo()
    scores = trackstar(cfg)
    assert {p: (root / p).stat().st_mtime_ns for p in stamps} == stamps  # earlier steps were not redone
    assert set(json.loads((root / "timings.json").read_text())) >= {"train_stats", "query", "mixed", "scores"}

    # ground truth, step by step: training vectors of the same documents, their sampled second moment,
    # the query moment, TrackStar's mixture, and cosines of H^-1/2-preconditioned vectors
    fields = {k: v for k, v in vars(cfg).items() if k in IndexConfig.__dataclass_fields__}
    train = build(
        IndexConfig(
            **{
                **fields,
                "run_path": str(tmp_path / "train"),
                "save_dtype": "float32",
                "unit_normalize": False,
            }
        )
    )
    t = np.asarray(train.all, np.float64)
    modules = train.manifest.modules
    _, rows = subsample(TokenizedDocs([np.zeros(2, np.int64)] * len(t), np.zeros(len(t), np.int64)), 12, 0)
    t_moments = _moments_of_rows(t[rows], modules)
    query = load_gradients(root / "query")
    q = np.asarray(query.all, np.float64)
    q_moments = explicit_moments(query)
    mixed = load_preconditioner(root / "mixed")
    total = np.zeros_like(t)
    qh = np.zeros_like(q)
    for m in modules:
        lt = np.linalg.eigvalsh(t_moments[m.name])
        lq = np.linalg.eigvalsh(q_moments[m.name])
        w = lt[-1] / (lt[-1] + lq[-3])  # w mu_3(Q) = (1 - w) mu_1(T)
        assert mixed.mixing["weights"][m.name] == pytest.approx(w, rel=1e-4)  # type: ignore[index]
        h = w * q_moments[m.name] + (1 - w) * t_moments[m.name]
        np.testing.assert_allclose(
            mixed.second_moments[m.name].numpy(), h, rtol=1e-4, atol=1e-6 * np.abs(h).max()
        )
        lam, vecs = np.linalg.eigh(h)
        lam = np.clip(lam, 0, None)
        half = (vecs * (lam + 0.1 * lam.mean()) ** -0.5) @ vecs.T
        sl = slice(m.offset, m.offset + m.dim)
        total[:, sl], qh[:, sl] = t[:, sl] @ half, q[:, sl] @ half
    expected = unit(total) @ unit(qh).T
    got = np.asarray(scores["scores"], np.float64)
    assert got.shape == (24, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    lines = (root / "top_k.jsonl").read_text().splitlines()
    assert len(lines) == 5 * cfg.top_k
    best = json.loads(lines[0])
    assert best["score"] == pytest.approx(float(expected[:, 0].max()), abs=1e-3)
    assert (root / "summary.md").read_text().count("## Query") == 5

    # a finished run is not redone; other options need --overwrite
    trackstar(cfg)
    assert {p: (root / p).stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(BergsonError, match="--overwrite"):
        trackstar(_cfg(tmp_path, corpus_file, damping=0.5))


def _optimizer_state(model_dir, path):
    """A real AdamW state after two steps on the model of ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), path)
    return path


def test_cli_normalizers_preconditioner_and_trackstar(tmp_path, model_dir, corpus_file):
    opt = _optimizer_state(model_dir, tmp_path / "optimizer.pt")
    common = [
        "--model",
        str(model_dir),
        "--token_batch_size",
        "256",
        "--projection_dim",
        "4",
        "--precision",
        "fp32",
    ]
    data = ["--dataset", str(corpus_file), "--split", "train[:8]", "--truncation", "--max_length", "48"]
    # after two steps most vocabulary rows of lm_head have tiny moments: normalized values outgrow float16
    norm = ["--optimizer_state", str(opt), "--normalizer_form", "rank_one", "--save_dtype", "float32"]
    run("build", str(tmp_path / "idx"), *data, *common, *norm)
    manifest = load_gradients(tmp_path / "idx").manifest
    assert manifest.normalizer is not None and manifest.normalizer["kind"] == "adafactor"
    out = run("preconditioner", str(tmp_path / "pre"), "--index", str(tmp_path / "idx")).stdout
    assert "second moments of 8 rows" in out
    assert (
        "already complete"
        in run("preconditioner", str(tmp_path / "pre"), "--index", str(tmp_path / "idx")).stderr
    )
    out = run(
        "trackstar",
        str(tmp_path / "ts"),
        *data,
        *common,
        *norm,
        "--query.dataset",
        str(ASSETS / "queries.jsonl"),
        "--query.split",
        "train[:2]",
        "--query.truncation",
        "--stats_documents",
        "6",
    ).stdout
    assert "summary.md" in out
    assert load_gradients(tmp_path / "ts" / "scores")["scores"].shape == (8, 2)
    bad = run(
        "build", str(tmp_path / "bad"), *data, *common, "--optimizer_state", str(corpus_file), check=False
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and str(corpus_file) in bad.stderr
