"""Train the example-sized GPT-NeoX on the fact corpus with ``transformers.Trainer`` (AdamW).

The model starts from the shipped weights of ``bergson/assets/tiny-pythia`` (2 layers, width
64, 1.15M parameters, the shipped 8k tokenizer): it already models English, so the training
budget goes into memorizing the facts, and the distractor passages (drawn from its own
pre-training corpus) behave like ordinary, already-seen training data. ``--init random``
starts from a fresh initialization of the same shape (``--hidden`` widens it; width 128 from
scratch recalled no more facts than width 64 from the shipped weights, at 1.4x the time).

Recipe (defaults): 40 epochs of batches of 16 documents (length-grouped), AdamW
(``adamw_torch``: betas 0.9/0.999, eps 1e-8) at peak learning rate 1e-2 with 5% linear warm-up
and cosine decay to 0, weight decay 0.1, gradient clipping 1.0, float32, one CPU thread, seed 0.
Each training document is one sequence, tokenized exactly as ``bergson build`` tokenizes it
(``tokenizer(text)``: no BOS/EOS added; loss on every next-token prediction), so the gradients
bergson computes are those of the examples the model was trained on.

The final checkpoint directory holds the model, the tokenizer, ``optimizer.pt`` (the AdamW
state dict, as in a Trainer checkpoint), ``scheduler.pt``, ``trainer_state.json`` and
``train_info.json`` (the recipe, timing and the recall).

Recall (:func:`fact_recall`): for each fact's query, the summed log-likelihood of the
completion " <object>" after the prompt is computed for every distinct object of the same
relation (10 candidates per relation with the default 100 facts); the fact counts as recalled
when the true object is strictly the most likely. ``exact_match`` (greedy decoding reproduces
the completion's tokens) is reported too.

    python -m benchmarks.fact_tracing.train --data_dir runs/fact_tracing/data --out runs/fact_tracing/model
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..common import ASSETS
from .corpus import FactCorpus, load

SHIPPED = ASSETS / "tiny-pythia"


class _Docs(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]]):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.ids[i]}


def _collate(pad_id: int):
    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
            mask[i, : len(b["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def make_model(init: str, hidden: int, seed: int) -> tuple[Any, Any]:
    """(model, tokenizer): the shipped tiny Pythia, or a fresh one of the same shape (width ``hidden``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHIPPED)
    if init == "shipped":
        if hidden != 64:
            raise ValueError("--init shipped keeps the shipped width 64; use --init random to widen")
        model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)
    else:
        cfg = AutoConfig.from_pretrained(SHIPPED)
        cfg.hidden_size = hidden
        cfg.intermediate_size = 4 * hidden
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model, tok


@torch.no_grad()
def fact_recall(model: Any, tok: Any, corpus: FactCorpus, batch_size: int = 256) -> dict[str, Any]:
    """Share of facts whose true object is the most likely completion among its relation's objects."""
    model.eval()
    cands = corpus.candidates()
    cand_ids = {
        r: [tok(" " + o, add_special_tokens=False)["input_ids"] for o in objs] for r, objs in cands.items()
    }
    hits, exact, per_rel = 0, 0, {}
    for q in corpus.queries:
        prompt = tok(q["prompt"])["input_ids"]
        options = cand_ids[q["relation"]]
        truth = cands[q["relation"]].index(q["completion"][1:])
        ll = []
        for start in range(0, len(options), batch_size):
            chunk = options[start : start + batch_size]
            n = max(len(prompt) + len(c) for c in chunk)
            ids = torch.zeros((len(chunk), n), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, c in enumerate(chunk):
                ids[i, : len(prompt) + len(c)] = torch.tensor(prompt + c)
                mask[i, : len(prompt) + len(c)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for i, c in enumerate(chunk):
                pos = torch.arange(len(prompt) - 1, len(prompt) + len(c) - 1)
                ll.append(float(logp[i, pos, torch.tensor(c)].sum()))
        ll_t = torch.tensor(ll)
        ok = bool((ll_t[truth] > torch.cat([ll_t[:truth], ll_t[truth + 1 :]])).all())
        hits += ok
        r = per_rel.setdefault(q["relation"], [0, 0])
        r[0] += ok
        r[1] += 1
        # greedy decoding of as many tokens as the completion has
        target = options[truth]
        ids = torch.tensor([prompt])
        for _ in target:
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        exact += ids[0, len(prompt) :].tolist() == target
    n = max(len(corpus.queries), 1)
    return {
        "recall": round(hits / n, 4),
        "exact_match": round(exact / n, 4),
        "recall_by_relation": {k: round(v[0] / v[1], 4) for k, v in per_rel.items()},
        "chance": round(float(np.mean([1 / len(cands[q["relation"]]) for q in corpus.queries])), 4),
    }


def train(
    data_dir: str | Path,
    out: str | Path,
    *,
    init: str = "shipped",
    hidden: int = 64,
    epochs: float = 40,
    lr: float = 1e-2,
    batch_size: int = 16,
    weight_decay: float = 0.1,
    warmup: float = 0.05,
    seed: int = 0,
    threads: int | None = None,
    recall_every: float = 0,
) -> dict[str, Any]:
    """Train on ``data_dir/train.jsonl``, save the final checkpoint to ``out``, return train_info."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    set_seed(seed)
    out = Path(out)
    corpus = load(data_dir)
    model, tok = make_model(init, hidden, seed)
    ids = [tok(d["text"])["input_ids"] for d in corpus.docs]
    steps_per_epoch = -(-len(ids) // batch_size)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        num_train_epochs=epochs,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        weight_decay=weight_decay,
        max_grad_norm=1.0,
        optim="adamw_torch",
        train_sampling_strategy="group_by_length",
        logging_steps=steps_per_epoch,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Docs(ids),
        data_collator=_collate(tok.pad_token_id or 0),
        processing_class=tok,
    )
    curve: list[dict[str, float]] = []
    if recall_every:

        class RecallCurve(TrainerCallback):
            def on_epoch_end(self, args, state, control, **kwargs):
                epoch = round(state.epoch or 0)
                if epoch % recall_every == 0 and epoch < epochs:
                    r = fact_recall(model, tok, corpus)
                    model.train()
                    curve.append({"epoch": epoch, "recall": r["recall"], "exact_match": r["exact_match"]})
                    print(json.dumps(curve[-1]), flush=True)

        trainer.add_callback(RecallCurve())
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start

    trainer.save_model(str(out))
    trainer.save_state()
    # the optimizer state as a Trainer checkpoint holds it (checkpoint-N/optimizer.pt)
    optimizer = cast(torch.optim.Optimizer, trainer.optimizer)
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    torch.save(cast(Any, trainer.lr_scheduler).state_dict(), out / "scheduler.pt")

    start = time.perf_counter()
    recall = fact_recall(model, tok, corpus)
    recall_s = time.perf_counter() - start
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    info = {
        "init": init,
        "hidden": hidden,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "steps": trainer.state.global_step,
        "batch_size": batch_size,
        "lr": lr,
        "schedule": f"cosine, warm-up {warmup}",
        "weight_decay": weight_decay,
        "optimizer": "AdamW (adamw_torch), betas (0.9, 0.999), eps 1e-8, grad clip 1.0",
        "train_tokens_per_epoch": int(sum(len(x) for x in ids)),
        "train_loss": round(float(result.training_loss), 4),
        "epoch_losses": losses,
        "train_s": round(train_s, 1),
        "recall_curve": curve,
        "recall_s": round(recall_s, 1),
        "threads": torch.get_num_threads(),
        **recall,
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def add_recipe_args(parser: Any) -> None:
    """The training recipe's options (shared by this script and the benchmark runner)."""
    parser.add_argument("--epochs", type=float, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--weight_decay", type=float, default=0.1)


def recipe_kwargs(args: Any) -> dict[str, Any]:
    """The options of :func:`add_recipe_args` (plus the seed) as keyword arguments of ``train``."""
    return {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "weight_decay", "seed")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", default="runs/fact_tracing/data")
    parser.add_argument("--out", default="runs/fact_tracing/model")
    parser.add_argument("--init", choices=["shipped", "random"], default="shipped")
    parser.add_argument("--hidden", type=int, default=64)
    add_recipe_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recall_every", type=float, default=0, help="also report recall every N epochs")
    args = parser.parse_args()
    info = train(
        args.data_dir,
        args.out,
        init=args.init,
        hidden=args.hidden,
        threads=args.threads,
        **recipe_kwargs(args),
        recall_every=args.recall_every,
    )
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
