"""The exact int8 matrix product behind the int8 search paths, through either kernel.

Ground truth: int64 products of the same integers. Both kernels must return them exactly (the
float32 route is exact while a dot product's partial sums stay below 2**24), so a search gives
bit-identical answers whichever kernel this CPU's probe picks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from bergson import BergsonError
from bergson.search import exact_topk, int_matmul
from tests.helpers.stores import synthetic_store


@pytest.fixture
def fresh_choice(monkeypatch):
    """No kernel chosen yet in this process (the probe, or the variable, decides again)."""
    monkeypatch.delenv("BERGSON_INT8_MATMUL", raising=False)
    int_matmul.reset()
    yield monkeypatch
    int_matmul.reset()


@pytest.mark.parametrize("name", int_matmul.KERNELS)
@pytest.mark.parametrize(
    ("m", "depth", "n"),
    [(16, 256, 300), (300, 256, 1), (7, 1024, 9), (7, 1025, 9), (33, 3000, 17), (5, 1, 3)],
)
def test_both_kernels_give_the_exact_integer_products(name, m, depth, n):
    gen = torch.Generator().manual_seed(depth + n)
    a = torch.randint(-127, 128, (m, depth), dtype=torch.int8, generator=gen)
    b_rows = torch.randint(-127, 128, (n, depth), dtype=torch.int8, generator=gen)
    for b in (b_rows.t(), b_rows.t().contiguous()):  # the callers pass either layout
        out = torch.full((m, n), 7, dtype=torch.int32)
        int_matmul._matmul(name, a, b, out)
        assert torch.equal(out, (a.long() @ b.long()).int())


@pytest.mark.parametrize("name", int_matmul.KERNELS)
def test_the_largest_products_stay_exact(name):
    # every term 127 * 127 (or its negative): the sums float32 must still hold exactly, at the
    # deepest single float32 block and past it (where blocks are added in int32)
    for depth in (int_matmul.EXACT_DEPTH, 4 * int_matmul.EXACT_DEPTH + 3):
        a = torch.full((3, depth), 127, dtype=torch.int8)
        a[1] = -127
        a[2, ::2] = -127
        b = torch.full((depth, 2), 127, dtype=torch.int8)
        b[:, 1] = -127
        out = torch.empty(3, 2, dtype=torch.int32)
        int_matmul._matmul(name, a, b, out)
        assert torch.equal(out, (a.long() @ b.long()).int())
        assert int(out.abs().max()) == depth * 127 * 127


def test_the_choice_is_measured_once_per_column_count_or_fixed_by_the_variable(fresh_choice):
    chosen = int_matmul.kernel(16)
    assert chosen in int_matmul.KERNELS
    assert int_matmul._chosen == {16: chosen}
    assert int_matmul.kernel(16) == chosen  # kept, not measured again
    int_matmul.reset()
    for name in int_matmul.KERNELS:
        fresh_choice.setenv("BERGSON_INT8_MATMUL", name.upper())
        int_matmul.reset()
        assert int_matmul.kernel(4) == name
    fresh_choice.setenv("BERGSON_INT8_MATMUL", "vnni")
    int_matmul.reset()
    with pytest.raises(BergsonError, match="BERGSON_INT8_MATMUL='vnni': choose int or float"):
        int_matmul.kernel(4)


def test_searches_are_identical_under_either_kernel(tmp_path, fresh_choice):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3000, 48)) * 10.0 ** rng.uniform(-2, 1, size=(3000, 1))).astype(np.float32)
    store = synthetic_store(tmp_path / "store", x, {"a": 30, "b": 18}, shard_size=700)
    answers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    options: list[dict[str, Any]] = [
        {"int8_prefilter": True},
        {"int8_prefilter": True, "unit_norm": True},
        {"int8_rerank": 4},
    ]
    for name in int_matmul.KERNELS:
        fresh_choice.setenv("BERGSON_INT8_MATMUL", name)
        int_matmul.reset()
        got = answers[name] = []
        for num_q in (1, 5, 40):
            q = np.random.default_rng(num_q).standard_normal((num_q, 48)).astype(np.float32)
            for kw in options:
                got.append(exact_topk(store, q, 10, num_threads=2, **kw))
        assert set(int_matmul._chosen.values()) == {name}
    exact = []
    for num_q in (1, 5, 40):
        q = np.random.default_rng(num_q).standard_normal((num_q, 48)).astype(np.float32)
        exact += [exact_topk(store, q, 10), exact_topk(store, q, 10, unit_norm=True), None]
    for (si, ii), (sf, i_f), ref in zip(answers["int"], answers["float"], exact):
        np.testing.assert_array_equal(ii, i_f)
        np.testing.assert_array_equal(si, sf)
        if ref is not None:  # the prefilter is exact: the float32 scan's answer
            np.testing.assert_array_equal(ii, ref[1])
