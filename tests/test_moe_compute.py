"""The routed experts' compute path (model/moe.py `Experts.forward`: one sort of the (token, slot) pairs per layer,
each hit expert on its contiguous slice, no work for an expert without tokens) against transformers' own experts
module run in float64 on the same weights: dequant(nf4) + s · B @ A per expert, merged. Outputs and the gradients
of the input, the routing weights and every LoRA A/B, on token counts that differ per expert, one expert with none
and a slot routed nowhere (-1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_kit.adapters.lora import LoRALinear, LoraSpec
from qlora_kit.model.moe import PROJECTIONS, Experts
from qlora_kit.quant.bnb import QuantLinear, QuantSpec
from archs import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster

E, H, I, R = 4, 64, 32, 4
# (T, 2) expert ids: expert 0 gets 5 rows, 1 gets 3, 2 gets 5 (token 6 twice), 3 none; one slot routed nowhere (-1)
ROUTES = torch.tensor([[0, 2], [1, 0], [2, 0], [0, 1], [2, -1], [1, 0], [2, 2]])


def _original(arch: str) -> nn.Module:
    """transformers' experts module for `arch`, float64, random weights (biases too for gpt-oss), eager loop."""
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2)
    else:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    module = cls(config).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3 if p.dim() == 3 else 0.1)
    return module


def _ours(original: nn.Module) -> Experts:
    """The same experts as qlora-kit trains them: nf4 per expert slice (fp32 compute), LoRA with random B."""
    experts = Experts(original, torch.float32)
    spec = QuantSpec("nf4", 64, True, torch.float32)
    for proj in PROJECTIONS:
        experts.set_weight(proj, getattr(original, proj).detach().float(),
                           lambda w, e: QuantLinear.from_weight(w.contiguous(), spec))
        if experts.has_bias:
            setattr(experts, f"{proj}_bias", nn.Parameter(getattr(original, f"{proj}_bias").detach().float(),
                                                          requires_grad=False))
    torch.manual_seed(1)
    for e in range(E):
        for proj in PROJECTIONS:
            lora = LoRALinear(getattr(experts[e], proj), LoraSpec(R, 2 * R, dtype=torch.float32))
            nn.init.normal_(lora.lora_B.weight, std=0.2)
            setattr(experts[e], proj, lora)
    return experts


def _merged_stack(experts: Experts, proj: str, lora: dict) -> torch.Tensor:
    """(E, ., .) float64 in the original's layout: dequant(W_e) + s · B_e @ A_e, differentiable in A and B."""
    rows = []
    for e in range(E):
        m = getattr(experts[e], proj)
        w = m.base.dequantize(torch.float32).double() + m.scaling * lora[e, proj, "B"] @ lora[e, proj, "A"]
        rows.append(w.t() if experts.transposed else w)
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_experts_forward_and_gradients_equal_transformers_float64(arch):
    original = _original(arch)
    experts = _ours(original)
    T = len(ROUTES)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, H, generator=g)
    w = torch.rand(T, 2, generator=g)
    dy = torch.randn(T, H, generator=g)
    assert torch.bincount(ROUTES[ROUTES >= 0], minlength=E).tolist() == [5, 3, 5, 0]

    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = experts(xs, ROUTES, ws)
    (y * dy).sum().backward()

    lora = {(e, p, ab): getattr(getattr(experts[e], p), f"lora_{ab}").weight.detach().double().requires_grad_()
            for e in range(E) for p in PROJECTIONS for ab in "AB"}
    params = {p: _merged_stack(experts, p, lora) for p in PROJECTIONS}
    if experts.has_bias:
        params |= {f"{p}_bias": getattr(original, f"{p}_bias") for p in PROJECTIONS}
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    live = ROUTES >= 0  # transformers' loop has no "nowhere" slot: route it to expert 0 with weight 0
    want = torch.func.functional_call(original, params, (xr, torch.where(live, ROUTES, 0), wr * live))
    (want * dy.double()).sum().backward()

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), want, **tol)
    torch.testing.assert_close(xs.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(ws.grad.double()[live], wr.grad[live], **tol)
    assert ws.grad[~live].abs().sum() == 0  # the nowhere slot got no gradient
    for (e, p, ab), ref in lora.items():
        got = getattr(getattr(experts[e], p), f"lora_{ab}").weight.grad
        if e == 3:  # no token: the expert never ran, so its adapter has no gradient at all
            assert got is None
        else:
            torch.testing.assert_close(got.double(), ref.grad, **tol)
    assert all(ref.grad.abs().sum() == 0 for (e, _, _), ref in lora.items() if e == 3)


def test_experts_with_no_routed_token_return_zeros():
    """Every slot routed nowhere (-1): no expert runs and the layer adds nothing."""
    experts = _ours(_original("qwen3_moe"))
    x = torch.randn(3, H, requires_grad=True)
    y = experts(x, torch.full((3, 2), -1), torch.ones(3, 2))
    assert torch.equal(y, torch.zeros(3, H))
