"""Mislabeled-example detection on digits by self-influence.

A seeded 10% of the training labels are changed to another class, the model (logistic
regression, MLP; see :mod:`benchmarks.quality.digits`) is trained on the corrupted set, and
the training examples are ranked by their self-influence: how much training on an example
lowers its own loss, a large value meaning that the model had to bend to fit it. Per method:

* ``dot``: |g|², the gradient's squared norm;
* ``adam``: |g / sqrt(v)|², the gradient normalized by Adam's second moment;
* ``trackstar``: |H^{-1/2} g̃|², the Adam-normalized gradient with TrackStar's training
  second-moment preconditioner (its cosine would make every self-score 1);
* ``ekfac``: gᵀ (F + δI)⁻¹ g with the EK-FAC Fisher (by default the expected Fisher over the
  model's labels; ``--fisher sampled [--fisher_samples K]`` draws labels instead);
* ``exact_if``: gᵀ H⁻¹ g with the exact Hessian (logistic regression);
* ``loss``: the training loss itself, the usual baseline (not an attribution method).

MAGIC is left out: a self-influence needs one reverse pass through training per training
example.

The digits models are plain ``nn.Module`` classifiers with their own loss, which the command's
model loading (a Hugging Face causal LM) cannot take, so their scores come from the custom-model
API above; their ``ekfac`` runs the command's own self-score statistic
(:func:`bergson.methods.self_influence.ekfac_self_scores`) on the custom model's batches. ``--lm`` runs the variant that goes through ``bergson self_influence`` itself (:func:`lm_variant`):
prompt/completion pairs cut from the shipped corpus, a seeded ``--flip`` share of the completions
swapped among themselves, the shipped tiny Pythia fine-tuned on them with the MAGIC recipe
machinery (``examples/magic/tiny.yaml``'s AdamW recipe, as ``benchmarks.quality.lm`` does), then
``python -m bergson self_influence`` per method (``dot``, ``adam``: dot with ``--optimizer_state``,
``trackstar`` with ``--optimizer_state``, ``ekfac``) and the training loss each store's rows record. Reported: ROC AUC of the ranking for the flipped labels, and the share of the
flipped examples found after inspecting the top 10% and 20% of the ranking. Prints JSON and
writes ``mislabel.md``, ``mislabel.json`` and ``mislabel.png`` to ``--out_dir``.

    python -m benchmarks.quality.mislabel [--flip 0.1]
    python -m benchmarks.quality.mislabel --lm [--lm_docs 160] [--lm_epochs 6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import bergson
from bergson.methods.ekfac import BatchSource
from bergson.methods.self_influence import ekfac_self_scores

from . import digits as D
from .common import save_json

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("loss", "dot", "adam", "trackstar", "ekfac", "exact_if")
LABELS = {
    "loss": "training loss (baseline)",
    "dot": "gradient norm²",
    "adam": "Adam-normalized norm²",
    "trackstar": "TrackStar-preconditioned",
    "ekfac": "EK-FAC self-influence",
    "exact_if": "exact IF self-influence",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(D.MODELS), choices=D.MODELS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--flip", type=float, default=0.1, help="fraction of training labels changed")
    p.add_argument("--train_size", type=int, default=600, help="training examples (at most 1437)")
    p.add_argument("--steps", type=int, default=D.Recipe.steps, help="full-batch Adam steps")
    p.add_argument("--projection_dim", type=int, default=16, help="of the gradient methods (0: exact)")
    D.add_fisher_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=str(RESULTS))
    p.add_argument("--lm", action="store_true", help="the LM variant, through `bergson self_influence`")
    p.add_argument("--lm_docs", type=int, default=160, help="LM variant: prompt/completion pairs")
    p.add_argument("--lm_epochs", type=int, default=6, help="LM variant: fine-tuning epochs")
    p.add_argument("--lm_methods", nargs="+", default=list(LM_METHODS), choices=LM_METHODS)
    p.add_argument("--lm_work", default="runs/quality_mislabel_lm", help="LM variant: work directory")
    return p.parse_args(argv)


def self_influence(
    kind: str, model: nn.Module, moments: D.Params, data: D.Digits, recipe: D.Recipe, args: argparse.Namespace
) -> dict[str, np.ndarray]:
    train_b = D.batches(data.x_train, data.y_train)
    common = {
        "projection_dim": args.projection_dim,
        "include_bias": True,
        "progress": False,
        "seed": args.seed,
    }
    normalizers = {
        name: bergson.AdamNormalizer(moments[f"{name}.weight"], moments[f"{name}.bias"], eps=recipe.eps)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    out: dict[str, np.ndarray] = {}
    methods = set(args.methods)
    if "loss" in methods:
        with torch.no_grad():
            out["loss"] = D.loss_fn(model, (data.x_train, data.y_train)).numpy()
    if "dot" in methods:
        g = bergson.per_example_gradients(model, train_b, D.loss_fn, **common).vectors
        out["dot"] = (g**2).sum(1).numpy()
    if methods & {"adam", "trackstar"}:
        g = bergson.per_example_gradients(model, train_b, D.loss_fn, normalizers=normalizers, **common)
        out["adam"] = (g.vectors**2).sum(1).numpy()
        h = bergson.fit_second_moment(g)
        out["trackstar"] = (h.apply(g.vectors, -0.5, g.layouts) ** 2).sum(1).numpy()
    if "ekfac" in methods:
        factors = bergson.fit_ekfac(
            model,
            train_b,
            D.fisher_loss_fn(args.fisher, args.seed, args.fisher_samples),
            include_bias=True,
            progress=False,
        )
        # the statistic `bergson self_influence --method ekfac` runs, on the custom model's batches:
        # gᵀ (F + δI)⁻¹ g per example, the diagonal of ekfac_scores without the N x N matrix
        source = BatchSource(model, train_b, D.loss_fn, factors.modules, True, progress=False)
        out["ekfac"] = ekfac_self_scores(source, factors.eigen, factors.corrected, 0.1, "relative")[0]
    if "exact_if" in methods and kind == "logreg":
        same = D.Digits(data.x_train, data.y_train, data.x_train, data.y_train, data.flipped)
        out["exact_if"] = np.diagonal(D.exact_influence(model, same, recipe)).copy()
    return {m: out[m] for m in METHODS if m in out and m in methods}


def detection(scores: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """ROC AUC and the share of flipped rows among the top 10% / 20% of the ranking."""
    from sklearn.metrics import roc_auc_score

    truth = np.zeros(len(scores), bool)
    truth[flipped] = True
    order = np.argsort(-scores, kind="stable")
    found = {
        f"found_at_{pct}pct": float(
            truth[order[: round(pct / 100 * len(scores))]].sum() / max(truth.sum(), 1)
        )
        for pct in (10, 20)
    }
    return {"auc": float(roc_auc_score(truth, scores)), **found}


def recall_curve(scores: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    truth = np.zeros(len(scores), bool)
    truth[flipped] = True
    return np.cumsum(truth[np.argsort(-scores, kind="stable")]) / max(truth.sum(), 1)


def evaluate(kind: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    start = time.perf_counter()
    data = D.load_digits(args.seed, args.train_size, flip=args.flip)
    recipe = D.Recipe(steps=args.steps)
    model, moments = D.trained(kind, data, recipe, args.seed)
    with torch.no_grad():
        accuracy = float((model(data.x_test).argmax(1) == data.y_test).double().mean())
    scores = self_influence(kind, model, moments, data, recipe, args)
    result = {
        "model": kind,
        "train_examples": len(data.x_train),
        "flipped": len(data.flipped),
        "test_accuracy": accuracy,
        "methods": {name: detection(s, data.flipped) for name, s in scores.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }
    return result, {name: recall_curve(s, data.flipped) for name, s in scores.items()}


LM_METHODS = ("dot", "adam", "trackstar", "ekfac")
PROMPT_CHARS, COMPLETION_CHARS = 120, 80


def lm_pairs(n: int, flip: float, seed: int) -> tuple[list[dict[str, str]], np.ndarray]:
    """The first ``n`` long-enough documents of the shipped corpus as prompt/completion pairs, a
    seeded ``flip`` share of them given another flipped pair's completion (a cyclic shift)."""
    import gzip

    from .lm import ASSETS

    rows = []
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        for line in f:
            text = " ".join(json.loads(line)["text"].split())
            if len(text) >= PROMPT_CHARS + COMPLETION_CHARS:
                rows.append(
                    {"prompt": text[:PROMPT_CHARS], "completion": text[PROMPT_CHARS:][:COMPLETION_CHARS]}
                )
            if len(rows) == n:
                break
    flipped = np.sort(np.random.default_rng(seed).choice(len(rows), round(flip * len(rows)), replace=False))
    swapped = [rows[i]["completion"] for i in np.roll(flipped, 1)]
    for i, completion in zip(flipped, swapped):
        rows[i] = {**rows[i], "completion": completion}
    return rows, flipped


def lm_variant(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Mislabeled completions found by ``bergson self_influence`` (see the module docstring)."""
    import subprocess
    import sys
    from dataclasses import replace

    from bergson.config import DataConfig, MagicConfig, load_yaml, save_yaml

    from .lm import ASSETS, RECIPE, train_checkpoint

    work = Path(args.lm_work)
    work.mkdir(parents=True, exist_ok=True)
    rows, flipped = lm_pairs(args.lm_docs, args.flip, args.seed)
    data_file = work / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(dataset=str(data_file), prompt_column="prompt", completion_column="completion",
                      truncation=True, max_length=64)  # fmt: skip
    recipe = load_yaml(MagicConfig, RECIPE)
    recipe = replace(recipe, run_path=str(work / "magic"), model=str(ASSETS / "tiny-pythia"),
                     device="cpu", data=data, query=replace(recipe.query, dataset=str(ASSETS / "queries.jsonl")),
                     training=replace(recipe.training, epochs=args.lm_epochs, seed=args.seed))  # fmt: skip
    save_yaml(recipe, work / "recipe.yaml")
    model_dir = work / "model"
    start = time.perf_counter()
    training = train_checkpoint(work / "recipe.yaml", model_dir)
    training["seconds"] = round(time.perf_counter() - start, 1)
    base = ["--model", str(model_dir), "--precision", "fp32", "--device", "cpu", "--dataset", str(data_file),
            "--prompt_column", "prompt", "--completion_column", "completion", "--truncation", "--max_length", "64",
            "--overwrite", "--top_k", "5"]  # fmt: skip
    proj = ["--projection_dim", str(args.projection_dim)]
    state = ["--optimizer_state", str(model_dir / "optimizer.pt")]
    extra = {"dot": [*proj], "adam": [*proj, *state], "trackstar": [*proj, *state], "ekfac": []}
    results: dict[str, Any] = {}
    commands = {}
    scores: dict[str, np.ndarray] = {}
    for name in args.lm_methods:
        method = "dot" if name == "adam" else name
        cmd = ["bergson", "self_influence", str(work / name), *base, "--method", method, *extra[name]]
        commands[name] = " ".join(cmd)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", *cmd], check=True)
        seconds = round(time.perf_counter() - start, 1)
        store = bergson.load_gradients(work / name / "scores")
        scores[name] = np.asarray(store["scores"], np.float64)[:, 0]
        results[name] = {**detection(scores[name], flipped), "seconds": seconds}
        if "loss" not in scores:
            scores["loss"] = np.asarray(store.rows["loss"], np.float64)
            results["loss"] = detection(scores["loss"], flipped)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    return {
        **D.run_header("mislabel", args, argv),
        "variant": "lm",
        "pairs": len(rows),
        "flipped": len(flipped),
        "training": training,
        "methods": results,
        "commands": commands,
        "load_1min": load,
    }


def write_lm_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        "# Mislabeled completions found by `bergson self_influence` (tiny Pythia)",
        "",
        f"Command: `{report['command']}` (1-minute load average {report['load_1min']} at the end).",
        "",
        f"{report['pairs']} prompt/completion pairs of the shipped corpus, {report['flipped']} with another pair's "
        f"completion; the tiny Pythia fine-tuned on them ({report['training']['steps']} AdamW steps, loss "
        f"{report['training']['first_loss']:.2f} -> {report['training']['last_loss']:.2f}), then each method's "
        "self-influence through the command.",
        "",
        "| method | AUC | found @ 10% | found @ 20% | seconds | command |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        cmd = report["commands"].get(name, "(the rows' training loss of the first store)")
        lines.append(
            f"| {name} | {m['auc']:.3f} | {m['found_at_10pct']:.3f} | {m['found_at_20pct']:.3f} | "
            f"{m.get('seconds', '')} | `{cmd}` |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        "# Mislabeled-example detection on digits by self-influence",
        "",
        f"Command: `{report['command']}` (wall {report['wall_seconds']:.0f} s on {report['machine']}).",
        "",
        f"{report['settings']['flip']:.0%} of the training labels changed to another class (seeded); "
        "examples ranked by self-influence. AUC: ROC AUC for the flipped labels; found @ x%: share of the "
        "flipped examples among the top x% of the ranking (random inspection finds x%).",
        "",
    ]
    for kind, res in report["models"].items():
        lines += [
            f"## {kind} ({res['train_examples']} training examples, {res['flipped']} flipped, "
            f"test accuracy {res['test_accuracy']:.3f})",
            "",
            "| method | AUC | found @ 10% | found @ 20% |",
            "|---|---|---|---|",
        ]
        for name, m in res["methods"].items():
            lines.append(
                f"| {LABELS[name]} | {m['auc']:.3f} | {m['found_at_10pct']:.3f} | {m['found_at_20pct']:.3f} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def write_plot(curves: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (kind, per) in zip(axes[0], curves.items()):
        for name, curve in per.items():
            x = np.arange(1, len(curve) + 1) / len(curve)
            ax.plot(x, curve, label=LABELS[name])
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
        ax.set_xlim(0, 0.5)
        ax.set_title(kind)
        ax.set_xlabel("share of training data inspected")
        ax.set_ylabel("share of flipped labels found")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    D.check_fisher_args(args)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.lm:
        report = lm_variant(args, argv)
        out = save_json(Path(args.out_dir), "mislabel_lm", report)
        write_lm_markdown(report, out / "mislabel_lm.md")
        return report
    start = time.perf_counter()
    results, curves = {}, {}
    for kind in args.models:
        results[kind], curves[kind] = evaluate(kind, args)
    report: dict[str, Any] = {
        **D.run_header("mislabel", args, argv),
        "models": results,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    out = save_json(Path(args.out_dir), "mislabel", report)
    write_markdown(report, out / "mislabel.md")
    write_plot(curves, out / "mislabel.png")
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
