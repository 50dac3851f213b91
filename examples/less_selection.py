"""LESS-style data selection: pick the training documents whose gradients match a target task.

The training pool is a synthetic corpus (``benchmarks/fact_tracing``): documents stating facts
of five relations about fictional entities (birthplaces, founders, capitals, authors,
rivers), sentences about the same entities that state no fact, and passages of the shipped
corpus. The target task is one relation, capitals ("The capital of Redroia is Mevel."), given
by ``--num_target`` documents about other, unseen countries; ``--num_eval`` more such documents
measure success. The steps follow LESS (Xia et al., 2024):

1. warm-up: train the shipped tiny model briefly on a random sample of the pool with AdamW and
   keep the optimizer state (``optimizer.pt``);
2. ``bergson build`` the pool's projected gradients of the transformer layers, divided by the
   square root of Adam's second moments (``--optimizer_state``);
3. ``bergson reduce`` the target examples' gradients (made the same way) to one query vector,
   the mean of their unit-normalized gradients;
4. ``bergson score --index`` the pool against it (cosine) and select the top ``--fraction``;
5. fine-tune the original model on the selected documents, and on a random subset of the same
   size, with the same recipe, and compare the loss on the evaluation documents.

    python examples/less_selection.py                                  # a pool of ~600 documents
    python examples/less_selection.py --num_facts 20 --num_passages 10 --num_eval 16 --fraction 0.1 --steps 10
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the synthetic corpus lives in benchmarks/fact_tracing

from benchmarks.fact_tracing import corpus as corpus_mod  # noqa: E402
from bergson import DataConfig, IndexConfig, ReduceConfig, ScoreConfig, build, reduce, score  # noqa: E402

ASSETS = ROOT / "bergson" / "assets"
TARGET = "capital"
MAX_LENGTH = 64  # tokens per document: keeps every step cheap


def batches(tok, texts: list[str], size: int):
    for s in range(0, len(texts), size):
        enc = tok(
            texts[s : s + size], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield enc["input_ids"], enc["attention_mask"], labels


def fine_tune(model, tok, texts: list[str], steps: int, lr: float, batch_size: int, seed: int):
    """AdamW on ``texts`` (cycled, shuffled) for ``steps`` steps; returns the optimizer."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    order: list[str] = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(texts, len(texts))
        chunk, order = order[:batch_size], order[batch_size:]
        ids, mask, labels = next(batches(tok, chunk, batch_size))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@torch.no_grad()
def mean_loss(model, tok, texts: list[str]) -> float:
    """Mean next-token loss per token over ``texts``."""
    model.eval()
    total, count = 0.0, 0
    for ids, mask, labels in batches(tok, texts, 16):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, reduction="sum", ignore_index=-100
        )
        total += float(ce)
        count += int((target != -100).sum())
    return total / count


def is_target(corpus: corpus_mod.FactCorpus, doc: dict) -> bool:
    """Whether ``doc`` states a fact of the target relation."""
    return any(corpus.facts[f]["relation"] == TARGET for f in doc["fact_ids"])


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run_dir", default="runs/less_selection")
    parser.add_argument("--num_facts", type=int, default=100, help="facts in the pool (20 per relation)")
    parser.add_argument("--num_passages", type=int, default=100, help="shipped-corpus passages in the pool")
    parser.add_argument("--num_target", type=int, default=8, help="target-task examples (the query)")
    parser.add_argument("--num_eval", type=int, default=24, help="held-out target documents (evaluation)")
    parser.add_argument("--fraction", type=float, default=0.05, help="share of the pool to select")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps on each subset")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--projection_dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    run = Path(args.run_dir)
    (run / "data").mkdir(parents=True, exist_ok=True)

    pool = corpus_mod.generate(args.num_facts, seed=args.seed, num_passages=args.num_passages)
    # target and evaluation: capital statements about countries the pool never mentions
    wanted = args.num_target + args.num_eval  # each fact is stated 3 times, 1 relation in 5
    unseen = corpus_mod.generate(5 * -(-wanted // 2), seed=args.seed + 1, num_passages=0)
    held_out = [d["text"] for d in unseen.docs if is_target(unseen, d)]
    if len(held_out) < wanted:
        parser.error(f"only {len(held_out)} held-out capital documents; lower --num_target or --num_eval")
    target = held_out[: args.num_target]
    evaluation = held_out[args.num_target : args.num_target + args.num_eval]
    is_capital = np.array([is_target(pool, d) for d in pool.docs])
    pool_texts = [d["text"] for d in pool.docs]
    pool_file = write_jsonl(run / "data" / "pool.jsonl", pool_texts)
    target_file = write_jsonl(run / "data" / "target.jsonl", target)
    print(
        f"pool: {len(pool_texts)} documents, {is_capital.sum()} of them state a capital; "
        f"target: {len(target)} capital statements about unseen countries"
    )

    # 1. warm-up on a random sample of the pool, keeping AdamW's state
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia")
    warm = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-pythia", dtype=torch.float32)
    sample = random.Random(args.seed).sample(pool_texts, max(args.batch_size, len(pool_texts) // 20))
    opt = fine_tune(warm, tok, sample, args.warmup_steps, args.lr, args.batch_size, args.seed)
    warm.save_pretrained(run / "warmup")
    tok.save_pretrained(run / "warmup")
    torch.save(opt.state_dict(), run / "warmup" / "optimizer.pt")

    common = {
        "model": str(run / "warmup"),
        "precision": "fp32",
        "device": "cpu",
        "projection_dim": args.projection_dim,
        "optimizer_state": str(run / "warmup" / "optimizer.pt"),
        "overwrite": True,
        # The transformer layers only: Adam's second moment of an output-embedding row is ~0 for
        # every token the warm-up never saw, and dividing by it would let rare tokens dominate.
        "modules": ["gpt_neox.layers.*"],
    }
    data = {"truncation": True, "max_length": MAX_LENGTH}
    # 2. the pool's Adam-normalized projected gradients
    print(
        f"$ bergson build {run / 'pool'} --model {run / 'warmup'} --dataset {pool_file} --optimizer_state ... --save_dtype float32"
    )
    # (Adam-normalized values can exceed float16's range: store them as float32)
    build(
        IndexConfig(
            run_path=str(run / "pool"),
            data=DataConfig(dataset=pool_file, **data),
            save_dtype="float32",
            **common,
        )
    )
    # 3. the target examples reduced to one query vector (mean of unit-normalized gradients)
    print(
        f"$ bergson reduce {run / 'target'} --dataset {target_file} --aggregation mean --unit_normalize ..."
    )
    reduce(
        ReduceConfig(
            run_path=str(run / "target"),
            data=DataConfig(dataset=target_file, **data),
            aggregation="mean",
            unit_normalize=True,
            **common,
        )
    )
    # 4. cosine of every pool document with the target vector
    print(
        f"$ bergson score {run / 'scores'} --index {run / 'pool'} --query_path {run / 'target'} --unit_normalize"
    )
    scores_store = score(
        ScoreConfig(
            run_path=str(run / "scores"),
            index=str(run / "pool"),
            query_path=str(run / "target"),
            unit_normalize=True,
            overwrite=True,
        )
    )
    n = len(pool_texts)
    scores = np.full(n, -np.inf)
    scores[scores_store.rows["row_id"]] = np.asarray(scores_store["scores"], np.float64)[:, 0]
    k = max(1, round(args.fraction * n))
    selected = np.argsort(-scores, kind="stable")[:k]
    randomly = np.random.default_rng(args.seed).choice(n, size=k, replace=False)
    print(f"\ntop {k} of {n} by cosine (* states a capital):")
    for i in selected[:8]:
        mark = "*" if is_capital[i] else " "
        print(f"  {mark} {scores[i]:+.3f}  [{pool.docs[i]['kind']}] {pool_texts[i][:80]}")

    # 5. the same fine-tune on each subset, from the original model
    results: dict[str, dict[str, float]] = {}
    base = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-pythia", dtype=torch.float32)
    results["before"] = {"eval_loss": round(mean_loss(base, tok, evaluation), 4)}
    for name, subset in (("selected", selected), ("random", randomly)):
        model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-pythia", dtype=torch.float32)
        torch.manual_seed(args.seed)
        texts = [pool_texts[i] for i in subset]
        fine_tune(model, tok, texts, args.steps, args.lr, args.batch_size, args.seed)
        results[name] = {
            "eval_loss": round(mean_loss(model, tok, evaluation), 4),
            "target_share": round(float(is_capital[subset].mean()), 3),
        }
    print(f"\nloss per token on {len(evaluation)} capital statements about unseen countries:")
    print(f"  before fine-tuning:       {results['before']['eval_loss']:.4f}")
    for name in ("selected", "random"):
        r = results[name]
        print(
            f"  fine-tuned on {name + ':':10s} {r['eval_loss']:.4f}   "
            f"({r['target_share']:.0%} of its {k} documents state a capital)"
        )
    better = results["selected"]["eval_loss"] < results["random"]["eval_loss"]
    print(f"the selected subset {'beats' if better else 'does not beat'} a random subset of the same size")
    print(
        json.dumps(
            {
                "pool": n,
                "selected_size": k,
                "pool_target_share": round(float(is_capital.mean()), 3),
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
