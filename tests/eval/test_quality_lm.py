"""The causal-LM quality benchmark (benchmarks/quality/lm.py) on a tiny slice: every method, one
shared set of retrains, and correlations recomputed independently from the retrain cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

from benchmarks.quality import lm


def test_quality_lm_quick_slice(tmp_path, capsys):
    out = tmp_path / "results"
    result = lm.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)  # stdout holds the JSON object alone
    assert printed == json.loads((out / "lm.json").read_text()) == json.loads(json.dumps(result))

    w = result["workload"]
    assert (w["documents"], w["queries"], w["epochs"]) == (16, 2, 1)
    assert set(result["methods"]) == set(lm.METHODS)
    names = [p["name"] for p in result["protocols"]]
    assert names == ["LDS", "leave-2%-out", "leave-5%-out"]
    assert [p["removed_per_subset"] for p in result["protocols"]] == [8, 1, 1]
    for m, e in result["methods"].items():
        assert e["scoring_wall_s"] > 0 and set(e["quality"]) == {*names, "top_k"}, m
        top = e["quality"]["top_k"]  # each query's 2 top-scored documents removed, against 2 random draws
        assert len(top["per_query_loss_change"]) == 2 and math.isfinite(top["mean_random"]), m
        for q in (e["quality"][n] for n in names):
            assert len(q["per_query_spearman"]) == 2
            for v in (q["mean_spearman"], *q["per_query_spearman"]):
                assert math.isnan(v) or -1.0 <= v <= 1.0

    # retrains are shared by all six methods: one baseline plus one per distinct subset (2% and 5%
    # of 16 documents both remove one document, drawn with the same seed, so they coincide)
    records = [json.loads(p.read_text()) for p in (tmp_path / "work" / "retrains").rglob("*.json")]
    runs = {tuple(r["removed"]): np.asarray(r["query_losses"]) for r in records if "removed" in r}
    assert len([k for k in runs if len(k) in (0, 1, 8)]) == 1 + 3 + 3  # the rest remove 2 (top-k)

    # LDS Spearman of the dot-product scores recomputed from the cached retrains (scipy's tie-aware ranks)
    from bergson import load_gradients

    scores = np.asarray(load_gradients(result["methods"]["dot"]["scores"])["scores"], np.float64)
    base = runs[()]
    halves = [k for k in runs if len(k) == 8]
    measured = np.stack([runs[k] - base for k in halves])
    predicted = np.stack([scores[list(k)].sum(0) for k in halves])
    per_query = [np.corrcoef(rankdata(measured[:, q]), rankdata(predicted[:, q]))[0, 1] for q in range(2)]
    assert result["methods"]["dot"]["quality"]["LDS"]["mean_spearman"] == pytest.approx(np.mean(per_query))

    # the gradient methods' checkpoint is the model MAGIC trained on its own with the same recipe
    from safetensors.torch import load_file

    work = Path(w["work"])
    mine = load_file(work / "checkpoint" / "model.safetensors")
    magics = load_file(work / "magic" / "model" / "model.safetensors")
    assert mine.keys() == magics.keys()
    for k in mine:
        np.testing.assert_allclose(mine[k].numpy(), magics[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)

    md = (out / "lm.md").read_text()
    for label in lm.LABELS.values():
        assert f"| {label} |" in md
    assert "python -m benchmarks.quality.lm --quick" in md
    png = (out / "lm.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(out / "lm.png").shape[2] in (3, 4)

    # a rerun reuses every finished step (same recorded times, no retraining)
    again = lm.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    capsys.readouterr()
    assert json.dumps(again["methods"]) == json.dumps(result["methods"])
    assert again["train_s"] == result["train_s"]
    assert len(list((tmp_path / "work" / "retrains").rglob("*.json"))) == len(records)


def test_quality_lm_rejects_bad_options(capsys):
    for argv, option in ((["--queries", "9"], "--queries"), (["--subsets", "1"], "--subsets")):
        with pytest.raises(SystemExit) as exc:
            lm.parse_args(argv)
        assert exc.value.code != 0 and option in capsys.readouterr().err


def test_held_out_queries_follow_the_shipped_ones(tmp_path):
    """--held_out_queries M: the shipped queries, then M corpus documents that no run trains on,
    each split into a prompt and a completion that join back into the document."""
    args = lm.parse_args(["--held_out_queries", "3", "--queries", "2", "--work", str(tmp_path)])
    path, count = lm.write_queries(args, tmp_path)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert count == len(rows) == 5
    shipped = [json.loads(line) for line in (lm.ASSETS / "queries.jsonl").read_text().splitlines()]
    assert rows[:2] == shipped[:2]
    for r in rows[2:]:
        assert r["corpus_row"] >= lm.HELD_OUT_FIRST > args.docs
        assert r["prompt"] + r["completion"] == r["text"] and r["prompt"] and r["completion"].strip()
        assert len(r["text"].split(" ")) <= lm.HELD_OUT_WORDS
    # without it, the shipped file itself
    assert lm.write_queries(lm.parse_args(["--work", str(tmp_path)]), tmp_path) == (
        str(lm.ASSETS / "queries.jsonl"),
        5,
    )
    with pytest.raises(SystemExit):
        lm.parse_args(["--held_out_queries", "2", "--docs", "1200"])
