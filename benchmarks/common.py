"""Shared set-up for benchmarks: a Pythia-14m-shaped model on the shipped tokenizer and corpus."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "bergson" / "assets"
CORPUS = ASSETS / "corpus.jsonl.gz"


def copy_shipped_tokenizer(out: Path) -> None:
    """Put the shipped 8k tokenizer's files in ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in (ASSETS / "tiny-pythia").iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)


def random_neox_dir(
    out: Path,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised GPT-NeoX of the given shape with the shipped 8k tokenizer
    (reused if ``out`` already holds one)."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    if (out / "config.json").is_file():
        return out
    copy_shipped_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False,
    )
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    return out


def pythia14m_dir(out: Path, seed: int = 0) -> Path:
    """A Pythia-14m-shaped model (6 layers, width 128); random weights do not change the cost per token."""
    return pythia_shaped_dir(out, "14m", seed)


SHAPES = {
    # name: (hidden, layers, heads, intermediate); the vocabulary is the shipped 8k tokenizer's
    "14m": (128, 6, 4, 512),
    "70m": (512, 6, 8, 2048),
    "160m": (768, 12, 12, 3072),
}


def pythia_shaped_dir(out: Path, shape: str, seed: int = 0) -> Path:
    """A randomly initialised model with the layer shapes of a Pythia size (``SHAPES``)."""
    hidden, layers, heads, intermediate = SHAPES[shape]
    return random_neox_dir(
        out,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        max_positions=2048,
        seed=seed,
    )


def corpus_slice(out: Path, num_docs: int) -> Path:
    """The first ``num_docs`` documents of the shipped corpus as a .jsonl file."""
    with gzip.open(CORPUS, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(num_docs), f)]
    out.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return out
