"""Cost of ``bergson test_model_configuration`` against ``bergson build`` of the same sentences.

A randomly initialised Llama of SmolLM-135M's width (hidden 576, 9 heads, 3 key/value heads,
intermediate 1536, vocabulary 49152; layers cut to ``--layers``) with the shipped tokenizer.
Both run in this process, CPU, fp32, projection dim 16, on the 8 built-in sentences; the
diagnostic is consistent as configured here, so its time is that of one tested setting.
Prints JSON: wall-clock and CPU seconds of each (best of ``--repeats``) and their ratios.

The first forward and backward pass of a process costs more than the later ones (first-touch
page faults on the memory-mapped weights, kernel and allocator set-up); a command run from the
shell pays it once, whichever command it is. Unless ``--no_warmup``, one untimed build runs
first so that the diagnostic, timed first, does not pay it alone. On a shared machine the
CPU seconds (``time.process_time``, every thread of the process) are the steadier figure, and
the load average is printed: with other work running, two OpenMP threads that spin while they
wait for each other slow the diagnostic's many small passes far more than the build's one
large pass (a ratio of 5 to 9 at a load of 6 where 3 was measured at a load of 4), so compare
figures taken under ``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1``.
``--model_dir`` keeps the config-built model between runs (it is rebuilt when missing).

    python -m benchmarks.diagnostics [--layers 4] [--repeats 2] [--threads 2] [--no_warmup]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
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
    parser.add_argument("--no_warmup", action="store_true", help="time the diagnostic in a cold process")
    parser.add_argument("--model_dir", default=None, help="keep the config-built model here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        where = Path(args.model_dir) / f"smollm-{args.layers}" if args.model_dir else root / "model"
        model = str(smollm_dir(where, args.layers))
        data = root / "sentences.jsonl"
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))

        def run_build(name: str) -> None:
            cfg = IndexConfig(  # type: ignore[call-arg]
                run_path=str(root / name), model=model, device="cpu", precision="fp32", projection_dim=16
            )
            cfg.data.dataset = str(data)
            build(cfg)

        if not args.no_warmup:
            run_build("warmup")
        diag, built, report = [], [], {}
        for r in range(args.repeats):
            with timed(diag):
                report = test_model_configuration(
                    ModelConfigTestConfig(model=model, device="cpu", precision="fp32")  # type: ignore[call-arg]
                )
            with timed(built):
                run_build(f"index{r}")
        wall = (min(w for w, _ in diag), min(w for w, _ in built))
        cpu = (min(c for _, c in diag), min(c for _, c in built))
        print(
            json.dumps(
                {
                    "layers": args.layers,
                    "threads": args.threads,
                    "warmup": not args.no_warmup,
                    "consistent": report.get("consistent"),
                    "settings_tested": sum(e["status"] == "tested" for e in report.get("settings", [])),
                    "diagnostic_s": round(wall[0], 3),
                    "build_s": round(wall[1], 3),
                    "ratio": round(wall[0] / wall[1], 2),
                    "diagnostic_cpu_s": round(cpu[0], 3),
                    "build_cpu_s": round(cpu[1], 3),
                    "cpu_ratio": round(cpu[0] / cpu[1], 2),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                }
            )
        )


@contextlib.contextmanager
def timed(into: list[tuple[float, float]]) -> Iterator[None]:
    """Append the block's (wall-clock, CPU) seconds to ``into``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into.append((time.perf_counter() - wall, time.process_time() - cpu))


if __name__ == "__main__":
    main()
