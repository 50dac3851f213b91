"""Shared set-up for benchmarks: a Pythia-14m-shaped model on the shipped tokenizer and corpus."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "bergson" / "assets"
CORPUS = ASSETS / "corpus.jsonl.gz"


def pythia14m_dir(out: Path, seed: int = 0) -> Path:
    """Save a randomly initialised Pythia-14m-shaped GPT-NeoX (6 layers, width 128) with the
    shipped 8k tokenizer; weights are random, which does not change the cost per token."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in (ASSETS / "tiny-pythia").iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False,
    )
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    return out


def corpus_slice(out: Path, num_docs: int) -> Path:
    """The first ``num_docs`` documents of the shipped corpus as a .jsonl file."""
    with gzip.open(CORPUS, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(num_docs), f)]
    out.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return out
