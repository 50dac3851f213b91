"""Tiny models built from transformers configs, and the shipped example assets (shared by the tests)."""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "bergson" / "assets"
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


# A document carrying HTML that the report and the served page must keep as text.
HOSTILE = '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & <b>bold</b>'
HOSTILE_ROW = 5


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A small jinja chat template (role markers, one end-of-text per turn) for the shipped tokenizer."""


def shipped_tokenizer(chat_template: str | None = None):
    """The shipped tiny-pythia tokenizer, optionally given a chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def target_tokens(docs, i: int):
    """The token ids that the padded labels of the collection loop mark as targets in document ``i``."""
    import numpy as np

    from bergson.data.batching import IGNORE, pad_batch

    _, labels = pad_batch(docs, np.array([i]), 0)
    return labels[0][labels[0] != IGNORE].numpy()
