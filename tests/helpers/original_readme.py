"""The original bergson package's README, case by case: each command as a user types it and each
Python snippet verbatim (run from a directory of stand-ins named like its hub ids, see
``standins.py``). Placeholders such as ``<model_name>`` are filled with those stand-ins.

Shared by ``tests/compat/test_original_readme.py`` (which asserts each case's result) and
``scripts/original_readme.py`` (which prints the case table).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .standins import GPT2, PILE, PYTHIA, make_standins


class CliCase(NamedTuple):
    name: str
    argv: tuple[str, ...]
    stdin: str = ""


def _fill(command: str) -> tuple[str, ...]:
    import shlex

    filled = (
        command.replace("<model_name>", PYTHIA)
        .replace("<dataset_name>", PILE)
        .replace("<reward_column_name>", "reward")
    )
    return tuple(shlex.split(filled))


# The query's source document: its own row must come first.
QUERY_ROW = 3


def texts_of(root: Path) -> list[str]:
    """The documents of the corpus stand-in."""
    return [json.loads(line)["text"] for line in (Path(root) / PILE / "train.jsonl").read_text().splitlines()]


def make_workdir(root: Path, repo: Path) -> Path:
    """A user's directory for the README's commands: the stand-ins, the README's example YAML
    (as this repository ships it), prompt/completion pairs, and GRPO rows: four texts sampled
    twice each, with rewards 1 and 0 (a group per text, as the original groups them)."""
    root = make_standins(Path(root))
    example = Path(repo) / "examples" / "magic" / "gpt2_wikitext_tiny.yaml"
    (root / "examples" / "magic").mkdir(parents=True, exist_ok=True)
    if example.is_file():
        (root / "examples" / "magic" / example.name).write_text(example.read_text())
    texts = texts_of(root)
    pairs = [{"prompt": t[:80], "completion": t[80:200]} for t in texts[:8]]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rewards = [{"text": t[:200], "reward": r} for t in texts[:4] for r in (1.0, 0.0)]
    (root / "rewards.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rewards))
    return root


CLI_CASES = [
    CliCase(
        "quickstart (older README)",
        _fill(
            "python -m bergson build runs/test --model EleutherAI/pythia-14m --dataset NeelNanda/pile-10k "
            "--truncation"
        ),
    ),
    CliCase(
        "quickstart build",
        _fill(
            "bergson build runs/index --model EleutherAI/pythia-14m --dataset NeelNanda/pile-10k --truncation "
            "--token_batch_size 4096"
        ),
    ),
    CliCase(
        "quickstart build, projected",
        _fill(
            "bergson build runs/index16 --model EleutherAI/pythia-14m --dataset NeelNanda/pile-10k "
            "--truncation --token_batch_size 4096 --projection_dim 16"
        ),
    ),
    CliCase("quickstart query", _fill("bergson query --index runs/index16 --unit_norm"), stdin="QUERY"),
    CliCase(
        "quickstart trackstar",
        _fill(
            "bergson trackstar runs/trackstar --model EleutherAI/pythia-14m --query.dataset NeelNanda/pile-10k "
            "--data.dataset NeelNanda/pile-10k --data.truncation --token_batch_size 4096 --query.truncation "
            '--query.split "train[:20]"'
        ),
    ),
    CliCase("quickstart magic", _fill("bergson magic examples/magic/gpt2_wikitext_tiny.yaml")),
    CliCase("pipeline YAML (later README)", _fill("bergson examples/magic/gpt2_wikitext_tiny.yaml")),
    CliCase("usage build", _fill("bergson build runs/usage --model <model_name> --dataset <dataset_name>")),
    CliCase(
        "prompt and completion columns",
        _fill(
            "bergson build runs/pairs --model <model_name> --dataset pairs.jsonl --prompt_column prompt "
            "--completion_column completion"
        ),
    ),
    CliCase(
        "on-the-fly reduce",
        _fill(
            "bergson reduce runs/reduced --model <model_name> --dataset <dataset_name> --aggregation mean "
            "--unit_normalize"
        ),
    ),
    CliCase(
        "on-the-fly score",
        _fill(
            "bergson score runs/scored --model <model_name> --dataset <dataset_name> --query_path runs/reduced "
            "--score individual --aggregation mean"
        ),
    ),
    CliCase(
        "index query with --model",
        _fill("bergson query --index  runs/usage --model <model_name> --unit_norm"),
        stdin="QUERY",
    ),
    CliCase(
        "GRPO rewards",
        _fill("bergson build runs/grpo --model <model_name> --dataset rewards.jsonl --reward_column reward"),
    ),
    CliCase("diagnostic", _fill("bergson test_model_configuration --model <model_name>")),
    CliCase(
        "diagnostic follow-up: math SDPA",
        _fill("bergson build runs/sdp --model <model_name> --force_math_sdp"),
    ),
    CliCase(
        "diagnostic follow-up: fp32 + TF32",
        _fill(
            "bergson build runs/tf32 --model <model_name> --precision fp32 --use_tf32_matmuls --force_math_sdp"
        ),
    ),
    CliCase(
        "diagnostic follow-up: fp32",
        _fill("bergson build runs/fp32 --model <model_name> --precision fp32 --force_math_sdp"),
    ),
]

# The README's Python snippets, verbatim. A prelude (``SNIPPET_PRELUDE``) defines what the README
# leaves to the reader (``args``, ``model``, ``tokenizer``, ``query``, ``training_args``,
# ``dataset``, ``data``, ``processor``); on a machine without CUDA the device strings are
# replaced by "cpu" (``on_cpu``).
ATTRIBUTOR = """\
from bergson import Attributor, FaissConfig

attr = Attributor(args.index, device="cuda")

...
query_tokens = tokenizer(query, return_tensors="pt").to("cuda:0")["input_ids"]

# Query the index
with attr.trace(model.base_model, 5) as result:
    model(query_tokens, labels=query_tokens).loss.backward()
    model.zero_grad()
"""

ATTRIBUTOR_FAISS = """\
attr = Attributor(args.index, device="cuda", faiss_cfg=FaissConfig("IVF1,SQfp16", mmap_index=True))

with attr.trace(model.base_model, 5) as result:
    model(query_tokens, labels=query_tokens).loss.backward()
    model.zero_grad()
"""

CALLBACK = """\
from bergson import GradientCollectorCallback, prepare_for_gradient_collection

callback = GradientCollectorCallback(
    path="runs/example",
    track_order=True,
)
trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=dataset,
    eval_dataset=dataset,
    callbacks=[callback],
)
trainer = prepare_for_gradient_collection(trainer)
trainer.train()
"""

ATTENTION_HEADS = """\
from bergson import AttentionConfig, IndexConfig, DataConfig
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("RonenEldan/TinyStories-1M", trust_remote_code=True, use_safetensors=True)

collect_gradients(
    model=model,
    data=data,
    processor=processor,
    path="runs/split_attention",
    attention_cfgs={
        # Head configuration for the TinyStories-1M transformer
        "h.0.attn.attention.out_proj": AttentionConfig(num_heads=16, head_size=4, head_dim=2),
    },
)
"""


def on_cpu(snippet: str) -> str:
    """The snippet with its CUDA device strings replaced by "cpu"."""
    return snippet.replace('"cuda:0"', '"cpu"').replace('"cuda"', '"cpu"')


__all__ = [
    "ATTENTION_HEADS",
    "ATTRIBUTOR",
    "ATTRIBUTOR_FAISS",
    "CALLBACK",
    "CLI_CASES",
    "GPT2",
    "QUERY_ROW",
    "make_workdir",
    "texts_of",
]
