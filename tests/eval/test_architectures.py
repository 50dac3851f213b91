"""``benchmarks/architectures.py`` on a tiny MoE family and its dense reference: the fields of each
family's object against what the model itself says, the summary, and --track_experts refused
when find_tracked_modules has no such keyword."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import architectures as arch

TINY_MOE: dict[str, Any] = dict(
    checkpoint="tiny OLMoE", config="OlmoeConfig", model="OlmoeForCausalLM",
    layers=2, real_layers=16, real_vocab=512,
    kw=dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2),
    moe=dict(experts=4, top_k=2, expert_width=24, shared_width=0, dense="LlamaConfig"),
)  # fmt: skip


@pytest.fixture(scope="module")
def results():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(arch.FAMILIES, "tiny-moe", TINY_MOE)
        names = arch.expand(["tiny-moe"], dense_refs=True)
        yield (
            names,
            [
                arch.run_family(n, tokens=48, seq_len=16, repeats=1, vocab=128, projection_dim=4)
                for n in names
            ],
        )


def _router_params(layers: int) -> int:
    kw = TINY_MOE["kw"]
    return layers * kw["hidden_size"] * kw["num_experts"]


def test_family_objects(results):
    names, (moe, dense) = results
    assert names == ["tiny-moe", "tiny-moe" + arch.DENSE_SUFFIX]
    for r in (moe, dense):
        assert 0 < r["tracked_share"] <= 1
        assert r["build_over_plain"] > 0 and r["build_tokens_per_s"] > 0 and r["plain_tokens_per_s"] > 0
        assert r["tokens"] == 48 and r["documents"] == 3 and len(r["build_times_s"]) == 1
        assert r["cut"] == {"layers": {"kept": 2, "real": 16}, "vocab": {"kept": 128, "real": 512}}
        # two-sided projection: p x p columns per tracked module, float16 in a store
        assert r["row_dim"] == r["tracked_modules"] * 4 * 4
        assert r["store_bytes_per_row"] == 2 * r["row_dim"]
        assert 0 < r["rss_after_model_mib"] <= r["peak_rss_build_mib"] <= r["peak_rss_mib"]
    # the dense reference tracks everything; by default the MoE's experts and routers are skipped
    assert dense["tracked_share"] == 1.0 and not dense["skipped"]
    assert moe["tracked_share"] < 1.0 and {s["reason"] for s in moe["skipped"]} == {"fused_experts", "router"}
    # same active parameter count but for the routers (hidden x experts per layer)
    assert moe["active_params"] - dense["active_params"] == _router_params(2)


def test_active_params_against_the_model():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(arch.FAMILIES, "tiny-moe", TINY_MOE)
        model, info = arch.make_model("tiny-moe", layers=1, vocab=64)
    kw = TINY_MOE["kw"]
    h, inter, heads, kv = kw["hidden_size"], kw["intermediate_size"], 4, 2
    head = h // heads
    attention = h * h * 2 + 2 * h * kv * head
    experts_used = 2 * 3 * h * inter  # top-2 experts: gate, up, down
    assert arch.active_params(model, TINY_MOE["moe"]) == attention + experts_used + _router_params(1)
    assert info["cut"]["layers"] == {"kept": 1, "real": 16}
    assert dict(model.named_parameters())["lm_head.weight"].shape == (64, h)


def test_summary(results):
    _, rows = results
    failed = {"family": "broken", "error": "exit status 1: boom"}
    s = arch.summarize([*rows, failed])
    assert s["families"] == 3 and s["failed"] == {"broken": "exit status 1: boom"}
    v = s["moe_vs_dense_reference"]["tiny-moe"]
    # a ratio of tokens/s rounded to 0.1, itself rounded to 3 decimals
    expected = rows[0]["build_tokens_per_s"] / rows[1]["build_tokens_per_s"]
    assert v["moe_build_over_dense_build"] == pytest.approx(expected, rel=1e-2, abs=1e-3)
    assert s["goals"]["not_fully_tracked"] == ["tiny-moe"] and not s["goals"]["all_fully_tracked"]
    assert set(s["tracked_share"]) == {"tiny-moe"}  # dense references are not families of their own


def test_track_experts_applies_to_moe_models_only():
    from tests.collect.test_experts import tiny
    from tests.helpers.families import make_family

    moe, dense = tiny("olmoe"), make_family("llama")
    assert len(arch.tracked_modules(moe, track_experts=True)) > len(
        arch.tracked_modules(moe, track_experts=False)
    )
    assert arch.tracked_modules(dense, track_experts=True).keys() == arch.tracked_modules(dense, False).keys()


def test_unknown_family_is_refused():
    with pytest.raises(SystemExit, match="--families: unknown family 'nope'"):
        arch.expand(["gpt2", "nope"], dense_refs=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "200"], "--tokens 200 must be a multiple of --seq_len 128"),
        (["--repeats", "0"], "--repeats, --threads and --projection_dim must be >= 1"),
        (["--vocab", "1"], "--vocab 1: give 0"),
    ],
)
def test_bad_sizes_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        arch.main(argv)
    assert message in capsys.readouterr().err
