"""FSDP2 (``--fsdp``) gives what an unsharded run gives, and quantized loading fails clearly
where it cannot run (gloo on the CPU; 2 processes where several are needed)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from bergson import BergsonError, build, load_gradients
from bergson.cli import parse
from bergson.config import DataConfig, MagicConfig
from bergson.distributed import decoder_layers, is_sharded, shard_model
from bergson.models import quantization_config
from tests.helpers.assets import tiny_neox
from tests.helpers.distributed import (
    assert_close,
    assert_same_store,
    cli,
    ekfac_cli,
    ekfac_one,
    one_cfg,
    options,
)


def test_sharded_model_has_fsdp_layers_and_same_gradients_in_one_process(tmp_path, model_dir, corpus_file):
    """--fsdp in one process (a group of one): the same store as without it."""
    base = one_cfg(tmp_path, model_dir, corpus_file, "plain")
    plain = build(base)
    sharded = build(replace(base, run_path=str(tmp_path / "fsdp"), fsdp=True))
    assert_same_store(plain, sharded)


def test_build_with_fsdp_on_two_workers_equals_one(tmp_path, model_dir, corpus_file):
    """Each rank holds half of every weight; ranks with fewer batches run idle steps so that
    every layer's weight gathers line up (the shards here give the ranks unequal batch counts)."""
    data = DataConfig(dataset=str(corpus_file), truncation=True, max_length=64)
    plain = build(one_cfg(tmp_path, model_dir, corpus_file, "plain", token_batch_size=64, data=data))
    out = tmp_path / "two"
    args = [a if a != "256" else "64" for a in options(model_dir, corpus_file)]  # one document per batch
    proc = cli("bergson", "build", str(out), *args, "--max_length", "64", "--fsdp", "--nproc_per_node", "2")
    assert "sharded with FSDP2 over 2 rank(s)" in proc.stderr
    two = load_gradients(out)
    assert two.manifest.producer["world_size"] == 2
    assert_same_store(plain, two)
    shares = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d) of 5 shards", proc.stderr)}
    assert sorted(shares) == [0, 1]


def test_ekfac_with_fsdp_on_two_workers_equals_one(tmp_path, model_dir, corpus_file):
    one = ekfac_one(tmp_path / "one", model_dir, corpus_file, "train[:11]", 64)
    out = tmp_path / "two"
    cli(*ekfac_cli(out, model_dir, corpus_file, "train[:11]", "64", "--fsdp", "--nproc_per_node", "2"))
    two = load_gradients(out / "scores")
    assert_close(np.asarray(two["scores"]), np.asarray(one["scores"]))


def test_shard_model_finds_decoder_layers_or_says_why():
    model = tiny_neox(dtype=torch.float32)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["GPTNeoXLayer"] * 2
    assert not is_sharded(model)

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(BergsonError, match="--fsdp: cannot find the decoder layers of this Plain"):
        shard_model(Plain(), torch.device("cpu"))


def test_quantized_precision_needs_cuda_and_bitsandbytes(tmp_path, model_dir, corpus_file):
    with pytest.raises(BergsonError, match="--precision int4: bitsandbytes quantization needs a CUDA device"):
        quantization_config("int4", torch.device("cpu"), torch.bfloat16)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(BergsonError, match=r"pip install 'bergson\[quantization\]'"):
            quantization_config("int8", torch.device("cuda"), torch.bfloat16)
    proc = cli(
        "bergson", "build", str(tmp_path / "q"), *options(model_dir, corpus_file, "--precision", "int4",
        "--device", "cpu"), check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--precision int4: bitsandbytes quantization needs a CUDA device" in proc.stderr
    assert not (tmp_path / "q" / "manifest.json").exists()


def test_magic_refuses_fsdp_and_quantized_models(tmp_path, model_dir, corpus_file):
    from bergson import magic

    data = DataConfig(dataset=str(corpus_file), truncation=True)
    base = MagicConfig(run_path=str(tmp_path / "m"), model=str(model_dir), data=data, query=data)
    # MAGIC trains the whole model in each process: it offers no --fsdp at all
    assert "fsdp" not in MagicConfig.__dataclass_fields__
    with pytest.raises(SystemExit):
        parse("magic", ["--run_path", str(tmp_path / "m"), "--fsdp"])
    with pytest.raises(BergsonError, match="bergson magic --precision int8"):
        magic(replace(base, precision="int8"))
