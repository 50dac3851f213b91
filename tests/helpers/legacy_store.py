"""Stores in the original package's on-disk format, written here from numpy arrays.

The format (bergson 2.5.1): ``info.json`` with ``num_grads``, ``num_items``, ``grad_sizes`` (module
name -> columns, in column order), ``base_dtype`` and ``attribute_tokens``; ``gradients.bin``, the raw
C-order [num_grads, total_dim] array; ``data.hf``, the rows saved with ``save_to_disk`` plus a
``loss`` column; ``processor_config.yaml`` with the projection settings; ``config.yaml``, the run's
options as a one-step pipeline. Older versions wrote a structured ``dtype`` (one field per module)
instead of ``base_dtype``: ``structured=True``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

LEGACY_MODEL = "./original-run/model"
LEGACY_DATASET = "./original-run/corpus.jsonl"
"""What a store's recorded run names by default: local paths that do not exist (never a hub id), so
readers fall back as for a model or dataset that is out of reach."""


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values rounded (toward zero) to bfloat16, as the raw uint16 bits."""
    return (np.ascontiguousarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_legacy_part(
    root: Path,
    grads: np.ndarray,
    grad_sizes: Mapping[str, int],
    texts: Sequence[str],
    *,
    dtype: str = "float16",
    losses: np.ndarray | None = None,
    lengths: Sequence[int] | None = None,
    projection_dim: int | None = None,
    structured: bool = False,
    model: str = LEGACY_MODEL,
) -> Path:
    """One directory of the original's format holding ``grads`` [rows, sum(grad_sizes)]."""
    from datasets import Dataset

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows, total = grads.shape
    assert total == sum(grad_sizes.values())
    raw = bfloat16_bits(grads) if dtype == "bfloat16" else np.ascontiguousarray(grads, dtype)
    raw.tofile(root / "gradients.bin")
    info: dict = {
        "attribute_tokens": False,
        "num_items": rows,
        "num_grads": rows,
        "grad_sizes": dict(grad_sizes),
    }
    if structured:
        assert dtype != "bfloat16"
        st = np.dtype([(n, np.dtype(dtype), (s,)) for n, s in grad_sizes.items()])
        info["dtype"] = {"names": list(st.names), "formats": [f"({s},){np.dtype(dtype).str}" for s in grad_sizes.values()],
                         "offsets": [st.fields[n][1] for n in st.names], "itemsize": st.itemsize}  # fmt: skip
    else:
        info["base_dtype"] = dtype
    (root / "info.json").write_text(json.dumps(info, indent=2))
    lengths = list(lengths) if lengths is not None else [3 + i for i in range(rows)]
    losses = np.asarray(losses if losses is not None else np.linspace(1.0, 2.0, rows), np.float32)
    Dataset.from_dict(
        {
            "text": list(texts),
            "input_ids": [list(range(n)) for n in lengths],
            "length": lengths,
            "loss": losses.tolist(),
        }
    ).save_to_disk(str(root / "data.hf"))
    proc = {"projection_dim": projection_dim, "reshape_to_square": False, "projection_type": "rademacher",
            "projection_target": "per_module", "projection_scale": "jl", "include_bias": False,
            "projection_seed": None, "projection_version": 2}  # fmt: skip
    (root / "processor_config.yaml").write_text(yaml.safe_dump(proc, sort_keys=False))
    run = {"steps": [{"build": {"index_cfg": {"run_path": str(root), "model": model, "loss_reduction": "sum",
                                               "data": {"dataset": LEGACY_DATASET, "split": "train"}},
                                 "preprocess_cfg": {"unit_normalize": False}}}]}  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    return root


def legacy_store_of_model(
    root: Path, model_dir: Path | str, rows: int = 3, seed: int = 0, **kw
) -> tuple[Path, np.ndarray]:
    """A full-gradient store of the original's format for the linear layers inside the model's
    ``base_model`` (named relative to it, as the original named them), filled with random values;
    returns (path, the values)."""
    import torch

    model = model_skeleton(model_dir)
    sizes = {
        n: m.weight.numel() for n, m in model.base_model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    grads = np.random.default_rng(seed).standard_normal((rows, sum(sizes.values()))).astype(np.float32)
    texts = [f"document {i}" for i in range(rows)]
    return write_legacy_part(
        Path(root), grads, sizes, texts, dtype="float32", model=str(model_dir), **kw
    ), grads


def model_skeleton(model_dir: Path | str):
    """The model's modules on the meta device (names and shapes, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
