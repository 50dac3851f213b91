"""Local stand-ins for the hub ids the original package's README names.

``make_standins(root)`` writes, under ``root``, directories named like the hub ids
(``EleutherAI/pythia-14m``, ``NeelNanda/pile-10k``, ``RonenEldan/TinyStories-1M``, ``gpt2``,
``EleutherAI/bergson-wikitext-512-chunks``), so that a command or snippet typed verbatim from
that README resolves them through ``from_pretrained`` / ``load_dataset`` when run from ``root``.
Everything is small and built offline from the shipped assets.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch

from .assets import ASSETS, TOKENIZER_FILES

PYTHIA = "EleutherAI/pythia-14m"
PILE = "NeelNanda/pile-10k"
TINYSTORIES = "RonenEldan/TinyStories-1M"
GPT2 = "gpt2"
WIKITEXT = "EleutherAI/bergson-wikitext-512-chunks"


def corpus_texts(n: int, start: int = 0) -> list[str]:
    with gzip.open(ASSETS / "corpus.jsonl.gz", "rt") as f:
        rows = [json.loads(line)["text"] for _, line in zip(range(start + n), f, strict=False)]
    return rows[start:]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _save_model(model: torch.nn.Module, out: Path) -> None:
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (ASSETS / "tiny-pythia" / name).is_file():
            shutil.copy(ASSETS / "tiny-pythia" / name, out / name)


def make_standins(root: Path, docs: int = 24, chars: int = 600) -> Path:
    """Write the stand-ins under ``root`` (idempotent); returns ``root``. The corpus stand-ins hold
    ``docs`` documents of the shipped corpus, each cut to ``chars`` characters."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

    root = Path(root)
    if (root / ".standins-ready").is_file():
        return _checked(root)
    shutil.copytree(ASSETS / "tiny-pythia", root / PYTHIA, dirs_exist_ok=True)
    texts = [t[:chars] for t in corpus_texts(docs)]
    _write_jsonl(root / PILE / "train.jsonl", [{"text": t, "meta": {"i": i}} for i, t in enumerate(texts)])
    wiki = [t[:chars] for t in corpus_texts(24, start=docs)]
    _write_jsonl(root / WIKITEXT / "train.jsonl", [{"text": t} for t in wiki[:20]])
    _write_jsonl(root / WIKITEXT / "test.jsonl", [{"text": t} for t in wiki[20:]])
    vocab = json.loads((ASSETS / "tiny-pythia" / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    # TinyStories-1M's shape: GPT-Neo, 64 wide, 16 heads of 4 (the README's AttentionConfig)
    neo = GPTNeoConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_layers=2,
        num_heads=16,
        attention_types=[[["global", "local"], 1]],
        window_size=256,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    _save_model(GPTNeoForCausalLM(neo).eval(), root / TINYSTORIES)
    gpt2 = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=512, bos_token_id=0, eos_token_id=0
    )
    _save_model(GPT2LMHeadModel(gpt2).eval(), root / GPT2)
    (root / ".standins-ready").write_text("")
    return _checked(root)


def _checked(root: Path) -> Path:
    """``root``, once every hub id the tests name is a local directory there, so that loading it
    (with the hub switched off in tests/conftest.py) can never fall through to a download."""
    missing = [h for h in (PYTHIA, PILE, TINYSTORIES, GPT2, WIKITEXT) if not (root / h).is_dir()]
    assert not missing, f"stand-ins missing under {root}: {missing}"
    return root
