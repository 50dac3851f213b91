"""The parts of benchmarks/gpu_checks.py that run without a GPU: the datasheet peaks it picks for
a card's name, the parameter count N of its 4·N·tokens ceiling, and the measured-peak fallback."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_checks import PEAK_TFLOPS, flop_params, measured_peak, table_peak


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA L4", None),
    ],
)
def test_the_datasheet_row_is_the_cards_own(name, key):
    got = table_peak(name, "bf16")
    if key is None:
        assert got is None
    else:
        assert got is not None and got[0] == PEAK_TFLOPS[key]["bf16"] * 1e12


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.mlp = torch.nn.Linear(16, 32)
        self.head = torch.nn.Linear(32, 64, bias=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed


def test_n_counts_every_matmul_weight_but_not_the_embedding_lookup():
    assert flop_params(_TinyLM()) == 16 * 32 + 32 + 32 * 64  # the linear layers and the head
    peak, source = measured_peak("cpu", "fp32", 64, tries=2)
    assert peak > 0 and "measured" in source
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored
