"""The classifier quality benchmarks and the mislabel example, each on a small slice."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


def test_classifier_benchmark_slice(tmp_path: Path) -> None:
    from benchmarks.quality import classifier

    argv = ["--models", "logreg", "--methods", "dot", "cosine", "ekfac", "source_adam", "magic", "exact_if"]
    argv += ["--train_size", "80", "--num_queries", "4", "--lds_subsets", "8", "--lko_subsets", "6"]
    argv += ["--topk_queries", "2", "--steps", "30", "--out_dir", str(tmp_path)]
    report = classifier.main(argv)
    assert {p.name for p in tmp_path.iterdir()} == {"classifier.json", "classifier.md", "classifier.png"}
    assert json.loads((tmp_path / "classifier.json").read_text())["models"].keys() == {"logreg"}
    res = report["models"]["logreg"]
    assert list(res["methods"]) == ["dot", "cosine", "ekfac", "source_adam", "magic", "exact_if"]
    assert res["train_examples"] == 80 and res["queries"] == 4
    for m in res["methods"].values():
        for key in ("lds", "leave_k_out"):
            assert -1 <= m[key]["mean_spearman"] <= 1 and m[key]["std_spearman"] >= 0
        assert math.isfinite(m["top_k_loss_increase"])
    assert res["methods"]["exact_if"]["spearman_vs_exact_if"] == pytest.approx(1.0)
    # sanity against real retraining: the exact derivative of training (MAGIC) and the exact
    # influence function predict which removals hurt a query, and removing a query's top-scored
    # examples raises its loss more than removing random ones
    assert res["methods"]["magic"]["leave_k_out"]["mean_spearman"] > 0.5
    assert res["methods"]["exact_if"]["lds"]["mean_spearman"] > 0.3
    for name in ("magic", "exact_if", "ekfac"):
        assert res["methods"][name]["top_k_loss_increase"] > res["random_k_loss_increase"]
    table = (tmp_path / "classifier.md").read_text()
    assert "| MAGIC |" in table and "| random removal |" in table


def test_mislabel_benchmark_slice(tmp_path: Path) -> None:
    from benchmarks.quality import mislabel

    argv = ["--models", "logreg", "--methods", "loss", "dot", "ekfac", "exact_if"]
    argv += ["--train_size", "200", "--steps", "40", "--out_dir", str(tmp_path)]
    report = mislabel.main(argv)
    assert {p.name for p in tmp_path.iterdir()} == {"mislabel.json", "mislabel.md", "mislabel.png"}
    res = report["models"]["logreg"]
    assert res["flipped"] == 20 and list(res["methods"]) == ["loss", "dot", "ekfac", "exact_if"]
    for name in ("ekfac", "exact_if"):
        m = res["methods"][name]
        # random inspection finds 10% / 20% of the flipped labels and has AUC 0.5
        assert m["auc"] > 0.8 and m["found_at_20pct"] > 0.5 and m["found_at_10pct"] <= m["found_at_20pct"]


def test_mislabel_example_runs_on_a_slice() -> None:
    example = runpy.run_path(str(ROOT / "examples" / "mislabel.py"))
    result = example["main"](train_size=300, epochs=60)
    assert result["auc"] > 0.8 and result["found_in_top_10pct"] > 0.3


def test_digits_checkpoints_are_the_training_run_saved_along_the_way() -> None:
    """SOURCE's checkpoints on digits: the last one is the trained model with its second moments, the
    first one is not."""
    import torch

    from benchmarks.quality import digits as D

    data, recipe = D.load_digits(0, 60), D.Recipe(steps=12)
    model, moments = D.trained("mlp", data, recipe)
    saved = D.checkpoints("mlp", data, recipe, D.source_steps(recipe.steps))
    assert len(saved) == D.SOURCE_CHECKPOINTS and D.source_steps(12)[-1] == 12
    last, v = saved[-1]
    for (name, p), (_, q) in zip(model.named_parameters(), last.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(moments[name], v[name], rtol=1e-12, atol=0)
    first = dict(saved[0][0].named_parameters())
    assert any(not torch.equal(p, first[n]) for n, p in model.named_parameters())
