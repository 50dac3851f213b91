"""TrackStar end to end on the shipped assets: against its definition, resumed after a kill, and from the shell."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from bergson import BergsonError, build, trackstar
from bergson.config import DataConfig, IndexConfig, TrackstarConfig
from bergson.core.files import disk_bytes
from bergson.data import TokenizedDocs
from bergson.methods.trackstar import _Pipeline
from bergson.runs.documents import subsample
from bergson.store import load_gradients
from bergson.transforms.preconditioners import is_complete, load_preconditioner
from tests.helpers.assets import ASSETS
from tests.helpers.cli import run_in_process as run
from tests.helpers.gradients import explicit_moments, unit

MODEL = ASSETS / "tiny-pythia"
trackstar_module = importlib.import_module("bergson.methods.trackstar")
QUERIES = DataConfig(
    dataset=str(ASSETS / "queries.jsonl"),
    prompt_column="prompt",
    completion_column="completion",
    truncation=True,
)


def _cfg(tmp_path, corpus_file, **kw) -> TrackstarConfig:
    defaults = dict(projection_dim=4, stats_documents=12, downweight_components=3)
    return TrackstarConfig(
        run_path=str(tmp_path / "ts"),
        model=str(MODEL),
        precision="fp32",
        data=DataConfig(dataset=str(corpus_file), truncation=True, max_length=64),
        query=QUERIES,
        token_batch_size=512,
        **{**defaults, **kw},
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
    # only the mix reads the two moments: deleted once mixed/ is complete, their bytes recorded
    timings = json.loads((root / "timings.json").read_text())
    assert not (root / "train_stats").exists() and not (root / "query_stats").exists()
    assert {k for k in timings if k.startswith("deleted_")} == {
        "deleted_train_stats_bytes",
        "deleted_query_stats_bytes",
    }
    assert timings["deleted_train_stats_bytes"] == timings["train_stats_bytes"] > 0
    assert timings["deleted_query_stats_bytes"] == timings["query_stats_bytes"] > 0
    stamps = {p: (root / p).stat().st_mtime_ns for p in ("mixed/preconditioner.json", "query/manifest.json")}
    monkeypatch.undo()
    for step in ("train_stats", "query", "query_stats", "mixed"):  # a resume must not redo them
        monkeypatch.setattr(_Pipeline, step, killed)
    scores = trackstar(cfg)
    monkeypatch.undo()
    assert {p: (root / p).stat().st_mtime_ns for p in stamps} == stamps  # earlier steps were not redone
    assert not (root / "train_stats").exists() and not (root / "query_stats").exists()
    timings = json.loads((root / "timings.json").read_text())
    assert set(timings) >= {"train_stats", "query", "mixed", "scores"}
    assert all(isinstance(v, (int, float)) for v in timings.values())  # flat: benchmarks print them
    for step, path in [
        ("mixed", "mixed"),
        ("query", "query"),
        ("scores", "scores"),
        ("summary", "top_k.jsonl"),
    ]:
        if step == "summary":
            assert timings["summary_bytes"] == disk_bytes(root / "summary.md") + disk_bytes(root / path)
        else:
            assert timings[f"{step}_bytes"] == sum(
                f.stat().st_size for f in (root / path).rglob("*") if f.is_file()
            )
    on_disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert 0 <= on_disk - timings["run_bytes"] < 100  # timings.json grew by the record itself
    assert "Disk use: train_stats/ " in (root / "summary.md").read_text()
    assert "deleted query_stats/" in (root / "summary.md").read_text()

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
    for step in ("train_stats", "query", "query_stats", "mixed", "scores"):
        monkeypatch.setattr(_Pipeline, step, killed)
    trackstar(cfg)
    monkeypatch.undo()
    assert {p: (root / p).stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(BergsonError, match="--overwrite"):
        trackstar(_cfg(tmp_path, corpus_file, damping=0.5))


def test_float32_statistics_match_float64_and_unmixed_runs_keep_train_stats(
    tmp_path, corpus_file, monkeypatch
):
    """The statistics are stored in float32: the scores differ from float64 storage by less than
    1e-4 of the largest |score| (measured: ~1e-6 here), the top 5 per query are the same, and
    mixed/ takes half the bytes. Without mixing, train_stats/ is the
    preconditioner the scores use: it stays, and no query_stats/ is fitted."""
    kw = dict(projection_dim=8, stats_documents=24)
    narrow = trackstar(_cfg(tmp_path / "f32", corpus_file, **kw))
    monkeypatch.setattr(trackstar_module, "STATS_DTYPE", torch.float64)
    wide = trackstar(_cfg(tmp_path / "f64", corpus_file, **kw))
    monkeypatch.undo()
    a, b = np.asarray(narrow["scores"], np.float64), np.asarray(wide["scores"], np.float64)
    assert a.shape == (24, 5) and np.abs(b).max() > 0.01
    print(
        "float32 vs float64 statistics: max |score difference|",
        np.abs(a - b).max(),
        "of max |score|",
        np.abs(b).max(),
    )
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()
    assert (np.argsort(-a, 0, kind="stable")[:5] == np.argsort(-b, 0, kind="stable")[:5]).all()
    f32 = load_preconditioner(tmp_path / "f32" / "ts" / "mixed")
    f64 = load_preconditioner(tmp_path / "f64" / "ts" / "mixed")
    assert (
        0.45
        < disk_bytes(tmp_path / "f32" / "ts" / "mixed") / disk_bytes(tmp_path / "f64" / "ts" / "mixed")
        < 0.55
    )
    for name, m in f64.second_moments.items():  # the float64 maths on rounded statistics
        assert f32.second_moments[name].dtype == torch.float64
        np.testing.assert_allclose(f32.second_moments[name], m, rtol=1e-5, atol=1e-6 * float(m.abs().max()))
    root = tmp_path / "plain" / "ts"
    trackstar(_cfg(tmp_path / "plain", corpus_file, downweight_components=0, **kw))
    assert is_complete(root / "train_stats") and not (root / "query_stats").exists()
    assert not (root / "mixed").exists()
    timings = json.loads((root / "timings.json").read_text())
    assert "query_stats" not in timings and not [k for k in timings if k.startswith("deleted_")]
    assert timings["train_stats_bytes"] == disk_bytes(root / "train_stats")


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
