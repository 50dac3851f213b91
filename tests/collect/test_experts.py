"""Per-expert gradients of fused MoE experts equal per-document autograd (float64)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from bergson.collect.experts import (
    ExpertCapture,
    RouterCapture,
    is_fused_experts,
    is_topk_router,
    per_document,
)
from bergson.errors import BergsonError

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 8}),
}


def tiny(family: str) -> nn.Module:
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        **extra,
    )
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).double().eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return model


def doc_losses(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return ce.sum(1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_expert_blocks_equal_autograd(family: str):
    model = tiny(family)
    experts = [m for m in model.modules() if is_fused_experts(m)]
    assert len(experts) == 2
    torch.manual_seed(1)
    ids = torch.randint(0, 32, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding, still routed through the experts
    mask[2, :2] = 0  # left padding

    caps = [ExpertCapture(m) for m in experts]
    doc_losses(model, ids, mask).sum().backward()
    for c in caps:
        c.remove()
    doc_of_token = torch.arange(3).repeat_interleave(6)
    torch.manual_seed(2)
    left, right = torch.randn(3, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)

    for n in range(3):
        model.zero_grad()
        doc_losses(model, ids, mask)[n].backward()
        for m, c in zip(experts, caps):
            (rows,) = c.rows
            for e in range(4):
                for pname in ("gate_up_proj", "down_proj"):
                    want = getattr(m, pname).grad[e]
                    key = f"expert{e}.{pname}"
                    if key not in rows:
                        assert torch.count_nonzero(want) == 0
                        continue
                    got = per_document(rows[key], doc_of_token, 3)[n]
                    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
                    if pname == "gate_up_proj":  # projected block: L G R^T
                        got_p = per_document(rows[key], doc_of_token, 3, left, right)[n]
                        torch.testing.assert_close(got_p, left @ want @ right.T, rtol=1e-9, atol=1e-12)
    # the check is not vacuous: every expert of every layer met some token
    assert all(len(c.rows[0]) == 8 for c in caps)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_router_blocks_equal_autograd(family: str):
    model = tiny(family)
    routers = [m for m in model.modules() if is_topk_router(m)]
    assert len(routers) == 2
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    caps = [RouterCapture(m) for m in routers]
    doc_losses(model, ids, mask).sum().backward()
    for c in caps:
        c.remove()
    doc_of_token = torch.arange(2).repeat_interleave(5)
    for n in range(2):
        model.zero_grad()
        doc_losses(model, ids, mask)[n].backward()
        for m, c in zip(routers, caps):
            (rows,) = c.rows
            want = m.weight.grad
            assert torch.count_nonzero(want) > 0
            torch.testing.assert_close(per_document(rows, doc_of_token, 2)[n], want, rtol=1e-9, atol=1e-12)


def test_refuses_other_activation():
    model = tiny("mixtral")
    m = next(m for m in model.modules() if is_fused_experts(m))
    m.act_fn = nn.GELU()
    cap = ExpertCapture(m)
    ids = torch.randint(0, 32, (1, 4))
    with pytest.raises(BergsonError, match="SiLU"):
        doc_losses(model, ids, torch.ones_like(ids)).sum().backward()
    cap.remove()
    with pytest.raises(BergsonError, match="not a fused experts"):
        ExpertCapture(nn.Linear(2, 2))
