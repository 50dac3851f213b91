"""EK-FAC influence scores with kronfluence, run inside ``benchmarks/.venvs/kronfluence``.

Started as a subprocess by ``benchmarks.peers.kronfluence_ekfac`` with that venv's Python
(``python -I``); it imports nothing from this repository. Conventions (kept identical to
bergson's so that scores and factors can be compared):

* Model: ``AutoModelForCausalLM.from_pretrained(model_dir, dtype=float32)``, ``.eval()``, CPU;
  forward with ``input_ids`` only (right padding, no attention mask, ``use_cache=False``).
* Tokens: ``tokenizer(text)["input_ids"]`` (the tokenizer's default special tokens), cut to
  ``--max_tokens``. With ``prompt``/``completion`` columns: ``tokenizer(prompt)`` +
  ``tokenizer(completion, add_special_tokens=False)``, loss on the completion only (as
  ``bergson.data.tokenize``). Batches are right-padded with id 0; padded and prompt
  positions carry label -100.
* Loss of a document = SUM over its positions t of CE(logits[t], token[t+1]); the training
  loss of a batch is the sum over its documents (what kronfluence differentiates per example).
  The query measurement is the same summed loss with the query's own labels.
* Fisher: true Fisher (``use_empirical_fisher=False``), labels sampled from the model's own
  predictions at the positions that carry a label. ``--sampling document`` (default) seeds a
  generator per training document exactly as ``bergson.methods.ekfac.targets`` does
  (sha256 of "seed:row"), so both libraries draw the same labels for the same document in both
  the covariance and the eigenvalue-correction pass; ``--sampling global`` draws from torch's
  global generator (seeded once with ``--seed``) as kronfluence's own language-model example
  does, giving fresh labels in each pass.
* Tracked modules: every ``nn.Linear`` (GPT-NeoX: query_key_value, dense, dense_h_to_4h,
  dense_4h_to_h of every layer, and the output head, which transformers 5.24 names
  ``lm_head``, not ``embed_out``). Without ``--include_bias`` (the default, like
  bergson's ``include_bias=False``) each biased Linear is split into a bias-free Linear (which
  kronfluence tracks) plus a bias added afterwards (which it does not), so the activation
  covariance has no homogeneous coordinate; module names are reported without the ``.linear``
  suffix of that split.
* The activation-covariance token mask is passed through ``Task.get_attention_mask`` (used by
  kronfluence only for the covariance pass, never given to the model), so that padding is
  excluded from A and from the token count.

Writes to ``--out_dir``: ``scores.npy`` [n_queries, n_train], ``result.json``, ``factors/``
(one folder per module of ``.npy`` files and ``index.json``), ``train_loss.npy`` and
``query_loss.npy`` (per-document summed losses, a convention check), ``kronfluence/`` (its
own safetensors outputs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata as md
import json
import logging
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import nn
from torch.utils.data import Dataset

IGNORE = -100
PAD_ID = 0
SPLIT_SUFFIX = ".linear"
STALE_OUTPUTS = (
    "result.json",
    "scores.npy",
    "scores_per_module.npz",
    "train_loss.npy",
    "query_loss.npy",
    "factors",
    "kronfluence",
)


def log(msg: str) -> None:
    print(f"[worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def document_seed(seed: int, row: int) -> int:
    """Same as ``bergson.methods.ekfac.document_seed``: a document's label-sampling seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------
# Data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize(
    rows: list[dict[str, Any]], tok: Any, max_tokens: int, mode: str
) -> tuple[list[list[int]], list[int]]:
    """Token ids per row and the first position whose token is a target (bergson's loss_start)."""
    if mode == "auto":
        mode = "completion" if rows and all("prompt" in r and "completion" in r for r in rows) else "text"
    ids: list[list[int]] = []
    starts: list[int] = []
    for r in rows:
        if mode == "completion":
            p = tok(r["prompt"] or "")["input_ids"]
            c = tok(r["completion"] or "", add_special_tokens=False)["input_ids"]
            seq, start = list(p) + list(c), len(p)
        else:
            seq, start = list(tok(r["text"] or "")["input_ids"]), 0
        ids.append(seq[:max_tokens])
        starts.append(start)
    return ids, starts


class Docs(Dataset):
    def __init__(self, ids: list[list[int]], starts: list[int]):
        self.ids, self.starts = ids, starts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], int, int]:
        return self.ids[i], self.starts[i], i


def collate(items: list[tuple[list[int], int, int]]) -> dict[str, torch.Tensor]:
    """Right padding with id 0; labels -100 on padding and prompt; the real-token mask for A."""
    longest = max(1, max(len(seq) for seq, _, _ in items))
    n = len(items)
    ids = torch.full((n, longest), PAD_ID, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for b, (seq, start, _) in enumerate(items):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        labels[b, : len(seq)] = ids[b, : len(seq)]
        labels[b, :start] = IGNORE
        mask[b, : len(seq)] = 1
    rows = torch.tensor([i for _, _, i in items], dtype=torch.long)
    # input_ids first: accelerate's find_batch_size reads the first tensor of the dict.
    return {"input_ids": ids, "labels": labels, "token_mask": mask, "rows": rows}


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits (predict token t+1 at position t)."""
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    return target


# ---------------------------------------------------------------------------------------------
# Task


class SummedLossTask(Task):
    def __init__(self, sampling: str, seed: int, tracked: list[str] | None = None):
        self.sampling = sampling
        self.seed = seed
        self.tracked = tracked

    def _logits(self, batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], use_cache=False).logits.float()

    def _sample(self, logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        target = target.clone()
        with torch.no_grad():
            if self.sampling == "document":
                for b, row in enumerate(rows.tolist()):
                    pos = (target[b] != IGNORE).nonzero().squeeze(1)
                    if len(pos) == 0:
                        continue
                    probs = torch.softmax(logits[b, pos].float(), -1).cpu()
                    gen = torch.Generator().manual_seed(document_seed(self.seed, int(row)))
                    target[b, pos] = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(target.device)
            else:
                valid = target != IGNORE
                probs = torch.softmax(logits[valid], -1)
                target[valid] = torch.multinomial(probs, 1).squeeze(1)
        return target

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = self._logits(batch, model)
        target = shifted(batch["labels"])
        if sample:
            target = self._sample(logits, target, batch["rows"])
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        logits = self._logits(batch, model)
        target = shifted(batch["labels"])
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.tracked  # None: every nn.Linear / nn.Conv2d leaf

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return batch["token_mask"]


@torch.no_grad()
def document_losses(model: nn.Module, data: Docs, batch_size: int) -> np.ndarray:
    out = np.zeros(len(data))
    for lo in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(lo, min(lo + batch_size, len(data)))])
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits.float()
        target = shifted(batch["labels"])
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(target.shape)
        out[lo : lo + len(target)] = ce.sum(1).double().numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Model


class SplitBias(nn.Module):
    """``linear(x) + bias`` with a bias-free ``nn.Linear`` child: kronfluence tracks the child
    only, so its factors and gradients cover the weight and not the bias."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.linear = nn.Linear(lin.in_features, lin.out_features, bias=False)
        self.linear.weight = lin.weight
        assert lin.bias is not None
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.bias


def split_biases(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SplitBias(getattr(parent, child)))
    return names


def public_name(name: str, split: set[str]) -> str:
    if name.endswith(SPLIT_SUFFIX) and name[: -len(SPLIT_SUFFIX)] in split:
        return name[: -len(SPLIT_SUFFIX)]
    return name


# ---------------------------------------------------------------------------------------------
# Factors


def export_factors(
    analyzer: Any, factors_name: str, out: Path, split: set[str], damping: float | None
) -> dict:
    """Per module: A, S (normalized as kronfluence does before its eigendecomposition), their
    eigenpairs and the EK-FAC eigenvalues Λ (lambda_matrix / num_lambda_processed)."""
    cov = analyzer.load_covariance_matrices(factors_name=factors_name)
    eig = analyzer.load_eigendecomposition(factors_name=factors_name)
    lam = analyzer.load_lambda_matrices(factors_name=factors_name)
    root = out / "factors"
    modules: dict[str, Any] = {}
    for name in cov["activation_covariance"]:
        pub = public_name(name, split)
        d = root / pub
        d.mkdir(parents=True, exist_ok=True)
        n_a = int(cov["num_activation_covariance_processed"][name].item())
        n_s = int(cov["num_gradient_covariance_processed"][name].item())
        n_l = int(lam["num_lambda_processed"][name].item())
        a = cov["activation_covariance"][name].double() / n_a
        s = cov["gradient_covariance"][name].double() / n_s
        lam_n = lam["lambda_matrix"][name].double() / n_l
        arrays = {
            "A": a,
            "S": s,
            "A_eigenvalues": eig["activation_eigenvalues"][name],
            "A_eigenvectors": eig["activation_eigenvectors"][name],
            "S_eigenvalues": eig["gradient_eigenvalues"][name],
            "S_eigenvectors": eig["gradient_eigenvectors"][name],
            "lambda": lam_n,
        }
        for key, t in arrays.items():
            np.save(d / f"{key}.npy", t.numpy())
        heuristic = 0.1 * float(lam_n.mean())
        modules[pub] = {
            "kronfluence_name": name,
            "A_shape": list(a.shape),
            "S_shape": list(s.shape),
            "lambda_shape": list(lam_n.shape),
            "num_activation_covariance_processed": n_a,
            "num_gradient_covariance_processed": n_s,
            "num_lambda_processed": n_l,
            "heuristic_damping": heuristic,
            "damping_used": heuristic if damping is None else damping,
            "lambda_mean": float(lam_n.mean()),
            "lambda_max": float(lam_n.max()),
        }
    index = {
        "modules": modules,
        "files": {
            "A": "activation_covariance / num_activation_covariance_processed (float64 of kronfluence's sum)",
            "S": "gradient_covariance / num_gradient_covariance_processed (float64 of kronfluence's sum)",
            "A_eigenvalues, A_eigenvectors, S_eigenvalues, S_eigenvectors": (
                "kronfluence's eigh of the normalized, symmetrized covariances (computed in "
                "eigendecomposition_dtype, stored in the covariance dtype); eigenvectors are columns"
            ),
            "lambda": "EK-FAC eigenvalues: lambda_matrix / num_lambda_processed, [out, in]",
        },
        "normalization": (
            "A = (1/T) sum_tokens x x^T and S = (1/T) sum_tokens g g^T with T the number of real "
            "(unpadded) tokens: kronfluence divides both by the same token count. bergson divides S "
            "by the number of documents N instead, so S_bergson = S * T / N (A agrees). "
            "lambda = (1/N) sum_docs (Q_S^T G_n Q_A)^2 with N the number of documents, as in bergson."
        ),
    }
    (root / "index.json").write_text(json.dumps(index, indent=2))
    return index


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model_dir", type=Path, required=True)
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--queries", type=Path, required=True)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--damping", default="0.001", help="absolute damping, or 'heuristic' (kronfluence's None)")
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--query_batch_size", type=int, default=0, help="0: all queries in one batch")
    p.add_argument("--query_mode", choices=["auto", "text", "completion"], default="auto")
    p.add_argument("--sampling", choices=["document", "global"], default="document")
    p.add_argument("--fisher", choices=["true", "empirical"], default="true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--include_bias", action="store_true")
    p.add_argument("--per_module_scores", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--exclude_modules", default="", help="comma-separated nn.Linear names not to track (e.g. lm_head)"
    )
    args = p.parse_args()

    t_start = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for stale in STALE_OUTPUTS:  # leftovers of an earlier run must not pass for this one's
        path = out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    damping = None if args.damping == "heuristic" else float(args.damping)
    dtype = getattr(torch, args.dtype)
    timings: dict[str, float] = {}
    rss: dict[str, float] = {}

    def mark(phase: str, start: float) -> None:
        timings[phase] = round(time.perf_counter() - start, 3)
        rss[phase] = round(peak_rss_mb(), 1)
        log(f"{phase}: {timings[phase]:.2f} s, peak RSS so far {rss[phase]:.0f} MB")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    mark("load_model_s", t)

    t = time.perf_counter()
    train_rows, query_rows = read_jsonl(args.train), read_jsonl(args.queries)
    train = Docs(*tokenize(train_rows, tok, args.max_tokens, "text"))
    query_mode = args.query_mode
    if query_mode == "auto":
        query_mode = "completion" if all("prompt" in r and "completion" in r for r in query_rows) else "text"
    queries = Docs(*tokenize(query_rows, tok, args.max_tokens, query_mode))
    mark("tokenize_s", t)
    lengths = np.array([len(x) for x in train.ids])
    loss_tokens = np.array([max(len(x) - max(s, 1), 0) for x, s in zip(train.ids, train.starts)])
    q_loss_tokens = np.array([max(len(x) - max(s, 1), 0) for x, s in zip(queries.ids, queries.starts)])

    t = time.perf_counter()
    np.save(out / "train_loss.npy", document_losses(model, train, args.batch_size))
    np.save(out / "query_loss.npy", document_losses(model, queries, args.batch_size))
    mark("loss_check_s", t)

    split = set() if args.include_bias else set(split_biases(model))
    exclude = {x for x in args.exclude_modules.split(",") if x}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = exclude - {public_name(n, split) for n in linears}
    if unknown:
        raise SystemExit(f"--exclude_modules: no such nn.Linear module(s): {sorted(unknown)}")
    chosen = [n for n in linears if public_name(n, split) not in exclude]
    task = SummedLossTask(args.sampling, args.seed, chosen if exclude else None)
    model = prepare_model(model, task)
    tracked = [public_name(n, split) for n, m in model.named_modules() if type(m).__name__ == "TrackedLinear"]

    analyzer = Analyzer(
        analysis_name="ekfac",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=False,
        output_dir=str(out / "kronfluence"),
    )
    loader_kwargs = DataLoaderKwargs(collate_fn=collate)
    analyzer.set_dataloader_kwargs(loader_kwargs)
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=args.fisher == "empirical",
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    score_args = ScoreArguments(
        damping_factor=damping,
        compute_per_module_scores=args.per_module_scores,
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
        query_gradient_svd_dtype=dtype,
    )
    fname, sname = "ekfac", "pairwise"

    t = time.perf_counter()
    analyzer.fit_covariance_matrices(
        factors_name=fname,
        dataset=train,
        per_device_batch_size=args.batch_size,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    mark("covariance_s", t)
    t = time.perf_counter()
    analyzer.perform_eigendecomposition(
        factors_name=fname, factor_args=factor_args, overwrite_output_dir=True
    )
    mark("eigendecomposition_s", t)
    t = time.perf_counter()
    analyzer.fit_lambda_matrices(
        factors_name=fname,
        dataset=train,
        per_device_batch_size=args.batch_size,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    mark("eigenvalue_correction_s", t)

    t = time.perf_counter()
    query_bs = args.query_batch_size or len(queries)
    scores = analyzer.compute_pairwise_scores(
        scores_name=sname,
        factors_name=fname,
        query_dataset=queries,
        train_dataset=train,
        per_device_query_batch_size=query_bs,
        per_device_train_batch_size=args.batch_size,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    mark("scores_s", t)
    if scores is None:  # kronfluence 1.0.1 saves the scores and returns None
        scores = analyzer.load_pairwise_scores(scores_name=sname)
    assert scores is not None
    if args.per_module_scores:
        per_module = {public_name(k, split): v.numpy() for k, v in scores.items()}
        total = sum(per_module.values())
        np.savez(out / "scores_per_module.npz", **per_module)
    else:
        total = scores["all_modules"].numpy()
    total = np.asarray(total)
    np.save(out / "scores.npy", total)

    t = time.perf_counter()
    index = export_factors(analyzer, fname, out, split, damping)
    mark("export_factors_s", t)

    heur = {m: d["heuristic_damping"] for m, d in index["modules"].items()}
    timings["factors_total_s"] = round(
        timings["covariance_s"] + timings["eigendecomposition_s"] + timings["eigenvalue_correction_s"], 3
    )
    timings["worker_total_s"] = round(time.perf_counter() - t_start, 3)
    versions = {}
    for pkg in (
        "kronfluence",
        "torch",
        "transformers",
        "accelerate",
        "numpy",
        "safetensors",
        "opt_einsum",
        "einops",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    result = {
        "tool": "kronfluence",
        "versions": versions,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "model_dir": str(args.model_dir),
            "train": str(args.train),
            "queries": str(args.queries),
            "query_mode": query_mode,
            "max_tokens": args.max_tokens,
            "batch_size": args.batch_size,
            "query_batch_size": query_bs,
            "damping_factor": damping,
            "damping_semantics": (
                "absolute: added to every EK-FAC eigenvalue of every module (lambda/N + damping), "
                "ScoreArguments.damping_factor; None would use 0.1 * mean(lambda/N) per module"
            ),
            "heuristic_damping_per_module": heur,
            "fisher": args.fisher,
            "label_sampling": args.sampling,
            "seed": args.seed,
            "include_bias": args.include_bias,
            "split_bias_modules": sorted(split),
            "tracked_modules": tracked,
            "excluded_modules": sorted(exclude),
            "dtype": args.dtype,
            "eigendecomposition_dtype": "float64",
            "model_dtype": "float32",
            "pad_id": PAD_ID,
            "factor_args": factor_args.to_dict(),
            "score_args": score_args.to_dict(),
        },
        "data": {
            "train_documents": len(train),
            "train_tokens": int(lengths.sum()),
            "train_loss_tokens": int(loss_tokens.sum()),
            "train_documents_without_loss_token": int((loss_tokens == 0).sum()),
            "max_document_tokens": int(lengths.max()) if len(lengths) else 0,
            "queries": len(queries),
            "query_loss_tokens": int(q_loss_tokens.sum()),
        },
        "scores_shape": list(total.shape),
        "scores_orientation": (
            "kronfluence: score = grad(measurement_q)^T (F + damping I)^-1 grad(loss_n); positive = training "
            "on document n lowers the query's loss (same orientation as bergson)"
        ),
        "timings_s": timings,
        "peak_rss_mb_after_phase": rss,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "outputs": {
            "scores": str(out / "scores.npy"),
            "factors": str(out / "factors"),
            "train_loss": str(out / "train_loss.npy"),
            "query_loss": str(out / "query_loss.npy"),
            "kronfluence_dir": str(out / "kronfluence"),
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
