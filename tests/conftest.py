"""Fixtures: tiny models built in-process and small slices of the shipped example assets."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

ASSETS = Path(__file__).resolve().parents[1] / "bergson" / "assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_neox(vocab: int = 48, hidden: int = 16, layers: int = 2, dtype=torch.float64, seed: int = 0):
    """A random GPT-NeoX (nn.Linear layers, biases on) small enough for exact checks."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        rotary_pct=0.5,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return GPTNeoXForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(vocab: int = 48, hidden: int = 16, layers: int = 2, dtype=torch.float64, seed: int = 0):
    """A random GPT-2 (its Conv1D layers store weights as in x out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=128,
        attn_implementation="eager",
        resid_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """The first 24 documents of the shipped corpus (cut to 600 characters) as a .jsonl file."""
    out = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        rows = [json.loads(next(f)) for _ in range(24)]
    out.write_text("".join(json.dumps({**r, "text": r["text"][:600]}) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A small random GPT-NeoX saved with the shipped tokenizer (fast to run on CPU)."""
    from benchmarks.common import random_neox_dir

    out = tmp_path_factory.mktemp("model")
    return random_neox_dir(out, hidden=32, layers=2, heads=2, intermediate=64, max_positions=512)
