"""Cost of ``bergson test_model_configuration`` against ``bergson build`` of the same sentences.

A randomly initialised Llama of SmolLM-135M's width (hidden 576, 9 heads, 3 key/value heads,
intermediate 1536, vocabulary 49152; layers cut to ``--layers``) with the shipped tokenizer.
Both run in this process, CPU, fp32, projection dim 16, on the 8 built-in sentences; the
diagnostic is consistent as configured here, so its time is that of one tested setting.
Prints JSON: diagnostic seconds, build seconds, their ratio (best of ``--repeats``).

    python -m benchmarks.diagnostics [--layers 4] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bergson import IndexConfig, ModelConfigTestConfig
from bergson.diagnostics import SENTENCES, test_model_configuration
from bergson.methods.build import build

from .common import copy_shipped_tokenizer


def smollm_dir(out: Path, layers: int, seed: int = 0) -> Path:
    """A SmolLM-135M-shaped Llama (random weights) with the shipped tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    copy_shipped_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="test_model_configuration cost against build")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = str(smollm_dir(root / "model", args.layers))
        data = root / "sentences.jsonl"
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
        diag_s, build_s, report = [], [], {}
        for r in range(args.repeats):
            t = time.perf_counter()
            report = test_model_configuration(
                ModelConfigTestConfig(model=model, device="cpu", precision="fp32")  # type: ignore[call-arg]
            )
            diag_s.append(time.perf_counter() - t)
            cfg = IndexConfig(  # type: ignore[call-arg]
                run_path=str(root / f"index{r}"),
                model=model,
                device="cpu",
                precision="fp32",
                projection_dim=16,
            )
            cfg.data.dataset = str(data)
            t = time.perf_counter()
            build(cfg)
            build_s.append(time.perf_counter() - t)
        print(
            json.dumps(
                {
                    "layers": args.layers,
                    "threads": args.threads,
                    "consistent": report.get("consistent"),
                    "settings_tested": sum(e["status"] == "tested" for e in report.get("settings", [])),
                    "diagnostic_s": round(min(diag_s), 3),
                    "build_s": round(min(build_s), 3),
                    "ratio": round(min(diag_s) / min(build_s), 2),
                }
            )
        )


if __name__ == "__main__":
    main()
