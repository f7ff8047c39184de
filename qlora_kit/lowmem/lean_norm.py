"""Memory-lean RMSNorm for training: the same forward as transformers' Llama/Mistral/Qwen RMSNorm, saving only
its 16-bit input and the (rows, 1) fp32 rsqrt for backward.

transformers' RMSNorm (x (..., H) in bf16, weight (H,)):

    xf = x.to(float32); rs = rsqrt(mean(xf^2, -1) + eps); y = weight * (xf * rs).to(bf16)

under plain autograd keeps xf, (..., H) fp32 (saved by pow and by the multiply), and rs: 4 H + 4 bytes per token,
twice per decoder layer and once more for the final norm. Here forward runs exactly those ops (bitwise the same
output, tests/test_long_context.py) inside one autograd Function that saves x (2 H bytes; for a layer's input norm
it is the checkpointed layer input itself, so nothing new) and rs (4 bytes); backward rebuilds xf from x and
applies the chain rule of the same ops in fp32 (gradients allclose to autograd's through transformers' module).
Cost: one bf16 -> fp32 cast and a multiply more in backward.

Only with gradients enabled (training); under no_grad (generate, evaluation, export) the module's own forward
runs. `deferred`: the loss head (loss.CausalLMLoss) applies the final norm itself, per chunk of label positions
inside its checkpoint, so that no (B, S, H) normed copy or norm input outlives the decoder's forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# Norms whose forward is exactly Llama's, weight * normed.to(input dtype) (checked in transformers 5's modeling code).
# Others keep their own forward (Gemma's (1 + weight) in fp32, OLMo 2's cast after the multiply, LayerNorms): lean
# norms are a memory saving with the same results, so a norm left out costs memory, never correctness.
# gpt-oss' RMSNorm multiplies by the weight in fp32 before the cast (like OLMo 2): not lean.
LEAN = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "GraniteRMSNorm",
        "MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "DeepseekV2RMSNorm", "DeepseekV3RMSNorm")


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # x (..., H) 16-bit or fp32, weight (H,)
        xf = x.to(torch.float32)
        rs = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rs)
        return weight * (xf * rs).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y (..., H) in y's dtype
        x, weight, rs = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:  # y = weight * n16: sum grad_y * n16 over every leading dim
            n16 = (x.to(torch.float32) * rs).to(x.dtype)
            grad_w = (grad_y * n16).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
            del n16
        if not ctx.needs_input_grad[0]:
            return None, grad_w, None
        # Two (..., H) fp32 tensors at a time (xf and grad_n, updated in place): a version with six such
        # temporaries was the decoder backward's peak at seq 8192 on the demo model (+54 MiB, every option on).
        xf = x.to(torch.float32)
        grad_n = (grad_y * weight).to(torch.float32)  # through the cast back to fp32
        # n = xf * rs, rs = (mean(xf^2) + eps)^-1/2:  d rs / d xf = -rs^3 xf / H
        grad_rs = torch.linalg.vecdot(grad_n, xf).unsqueeze(-1)  # (..., 1): sum(grad_n * xf) without a temporary
        coef = grad_rs.mul_(rs.pow(3)).mul_(-1.0 / x.shape[-1])  # (..., 1)
        grad_x = grad_n.mul_(rs).addcmul_(xf, coef)
        del xf
        return grad_x.to(x.dtype), grad_w, None

def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:  # bound to an RMSNorm module as its forward
    if self.deferred:
        return x  # the caller normalises later (loss.CausalLMLoss)
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return _LeanRMSNorm.apply(x, self.weight, self.variance_epsilon)
    return type(self).forward(self, x)


def make_lean(model: nn.Module) -> int:
    """Give every Llama/Mistral/Qwen RMSNorm of `model` the lean training forward. Names, parameters and the
    no-grad forward stay as they are. Returns how many were changed."""
    n = 0
    for m in model.modules():
        if type(m).__name__ in LEAN and "forward" not in m.__dict__:
            m.forward = types.MethodType(_lean_forward, m)
            m.lean, m.deferred = True, False
            n += 1
    return n


def make_plain(model: nn.Module) -> int:
    """Undo make_lean: transformers' own forward again (benchmarks compare the two). Returns how many."""
    n = 0
    for m in model.modules():
        if getattr(m, "lean", False):
            del m.forward
            m.lean = False
            n += 1
    return n


def norm_apply(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's own computation on x, even while it is deferred."""
    return _LeanRMSNorm.apply(x, norm.weight, norm.variance_epsilon) if torch.is_grad_enabled() else \
        type(norm).forward(norm, x)
