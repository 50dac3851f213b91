"""Loss masks and weights: completion, chat (assistant turns only) and Dr. GRPO advantages."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from bergson import collect_gradients
from bergson.config import DataConfig
from bergson.data import tokenize_documents
from bergson.data.tokenize import grpo_advantages, tokenize_conversations
from bergson.errors import BergsonError
from tests.helpers.assets import ASSETS, CHAT_TEMPLATE, shipped_tokenizer, target_tokens
from tests.helpers.cli import run_in_process as run

TEMPLATE = CHAT_TEMPLATE
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return shipped_tokenizer(TEMPLATE)


def test_completion_mask_selects_the_completion(tokenizer):
    ds = datasets.Dataset.from_dict(
        {"text": ["The capital of France is", "Two plus two"], "c": [" Paris.", " is four."]}
    )
    docs = tokenize_documents(ds, tokenizer, DataConfig(completion_column="c", chat_template="never"), 64)
    for i, comp in enumerate(ds["c"]):
        assert tokenizer.decode(target_tokens(docs, i)) == comp
    assert docs.num_loss_tokens().tolist() == [len(tokenizer(c)["input_ids"]) for c in ds["c"]]


def test_chat_mask_selects_exactly_the_assistant_turns(tokenizer):
    ds = datasets.Dataset.from_dict({"messages": CONVERSATIONS})
    docs = tokenize_documents(ds, tokenizer, DataConfig(conversation_column="messages"), 256)
    eos = tokenizer.eos_token
    for i, conv in enumerate(CONVERSATIONS):
        expected = "".join(m["content"] + eos + "\n" for m in conv if m["role"] == "assistant")
        assert tokenizer.decode(target_tokens(docs, i)) == expected
        ids = docs.input_ids[i]
        # the template writes the BOS itself; tokenizing must not add a second one (nor an EOS)
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
        text = tokenizer.apply_chat_template(conv, tokenize=False)
        assert tokenizer.decode(ids) == text
        assert int((ids == tokenizer.eos_token_id).sum()) == len(conv) + 1  # BOS (same id) + one per turn
    assert docs.num_loss_tokens()[1] == len(target_tokens(docs, 1))


def test_chat_truncation_cuts_the_mask(tokenizer):
    ds = datasets.Dataset.from_dict({"messages": CONVERSATIONS[:1]})
    docs = tokenize_documents(ds, tokenizer, DataConfig(conversation_column="messages", truncation=True), 30)
    assert len(docs.input_ids[0]) == 30 and len(docs.targets(0)) == 30
    full = tokenize_documents(ds, tokenizer, DataConfig(conversation_column="messages"), 256)
    assert (docs.targets(0) == full.targets(0)[:30]).all()


def test_chat_errors(tokenizer):
    ds = datasets.Dataset.from_dict({"messages": CONVERSATIONS})
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia")
    with pytest.raises(BergsonError, match="no chat template"):
        tokenize_conversations(ds, plain, "messages")
    with pytest.raises(BergsonError, match="no such column"):
        tokenize_conversations(ds, tokenizer, "chat")
    bad = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": 3}]]})
    with pytest.raises(BergsonError, match="row 0"):
        tokenize_conversations(bad, tokenizer, "messages")
    # a template that drops earlier assistant turns cannot be split into turns
    rewriting = tokenizer.__class__.from_pretrained(ASSETS / "tiny-pythia")
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}\n"
        "{% endif %}{% endfor %}"
    )
    with pytest.raises(BergsonError, match="prefixes"):
        tokenize_conversations(ds, rewriting, "messages")
    with pytest.raises(BergsonError, match="cannot be combined"):
        tokenize_documents(
            ds, tokenizer, DataConfig(conversation_column="messages", completion_column="x"), 64
        )


def test_grpo_advantages_on_a_hand_made_table():
    prompts = ["a", "a", "a", "b", "b", "c", "d"]
    rewards = [1.0, 0.0, None, 2, 4, 3.0, float("nan")]
    adv, missing = grpo_advantages(prompts, rewards)
    np.testing.assert_allclose(adv, [0.5, -0.5, 0.0, -1.0, 1.0, 0.0, 0.0])
    assert missing.tolist() == [False, False, True, False, False, False, True]
    with pytest.raises(BergsonError, match="row 1"):
        grpo_advantages(["a", "a"], [1.0, "good"], "reward")


def test_grpo_loss_gradient_is_advantage_times_log_likelihood_gradient(tokenizer, caplog):
    """Stored full gradients (p = 0) against autograd of -A log p(completion | prompt)."""
    from bergson.models import find_tracked_modules
    from tests.helpers.assets import tiny_neox

    model = tiny_neox(vocab=len(tokenizer), hidden=16)
    ds = datasets.Dataset.from_dict(
        {
            "text": ["Q: one", "Q: one", "Q: two", "Q: two", "Q: two"],
            "c": [" yes it is", " no", " maybe so", " sure", " never"],
            "r": [1.0, 0.0, 0.5, None, 1.5],
        }
    )
    with caplog.at_level("WARNING"):
        docs = tokenize_documents(
            ds, tokenizer, DataConfig(completion_column="c", reward_column="r", chat_template="never"), 64
        )
    assert "1 of 5 rows have no reward" in caplog.text
    np.testing.assert_allclose(docs.weights, [0.5, -0.5, -0.5, 0.0, 0.5])
    assert docs.num_loss_tokens()[3] == 0
    modules = find_tracked_modules(model, ["gpt_neox.layers.1.mlp.*", "lm_head"])
    sink = collect_gradients(model, docs, modules=modules, projection_dim=0, progress=False)
    for i in range(len(docs)):
        model.zero_grad()
        seq = torch.as_tensor(docs.input_ids[i])[None]
        logp = torch.log_softmax(model(seq).logits[0, :-1], -1).gather(1, seq[0, 1:, None])[:, 0]
        start = int(docs.loss_start[i])
        log_likelihood = logp[max(start, 1) - 1 :].sum()
        weight = 0.0 if ds["r"][i] is None else docs.weights[i]
        (-weight * log_likelihood).backward()
        expected = torch.cat([m.weight.grad.flatten() for m in modules.values()]).numpy()
        np.testing.assert_allclose(sink.vectors[i], expected, rtol=1e-9, atol=1e-12)
    assert np.abs(sink.vectors[3]).max() == 0.0 and np.abs(sink.vectors[0]).max() > 0


def test_cli_losses(tmp_path, model_dir):
    data = tmp_path / "rl.jsonl"
    rows = [
        {"prompt": "Q: one", "answer": " yes", "reward": 1.0},
        {"prompt": "Q: one", "answer": " no", "reward": 0.0},
        {"prompt": "Q: two", "answer": " sure", "reward": None},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(model_dir), "--precision", "fp32", "--device", "cpu", "--projection_dim", "4"]
    run("build", str(tmp_path / "grpo"), "--dataset", str(data), "--prompt_column", "prompt",
        "--completion_column", "answer", "--reward_column", "reward", *common)  # fmt: skip
    manifest = json.loads((tmp_path / "grpo" / "manifest.json").read_text())
    assert manifest["loss"]["kind"] == "grpo"
    # without a completion column the whole text is the completion (tests/data/test_compat_data.py)
    proc = run("build", str(tmp_path / "bad"), "--dataset", str(data), "--prompt_column", "prompt",
               "--reward_column", "reward", "--skip_nan_rewards", "--chunk_length", "4", *common, check=False)  # fmt: skip
    assert proc.returncode != 0 and "--chunk_length 4 with --reward_column" in proc.stderr
    assert "Traceback" not in proc.stderr
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    proc = run("build", str(tmp_path / "chat"), "--dataset", str(chat), "--conversation_column", "messages",
               *common, check=False)  # fmt: skip
    assert proc.returncode != 0 and "no chat template" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "chat" / "manifest.json").exists()
