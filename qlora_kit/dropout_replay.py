"""LoRA dropout without saved copies: the mask is regenerated in backward from the RNG state saved in forward.

`lora_A(dropout(x))` in plain autograd keeps, per adapter, the dropped copy of x (saved by lora_A's matmul) and
the dropout noise (saved by the multiply): for q, k, v reading the same normed hidden state that is 3 x 2 copies of
(B, S, H) where one would do. Here each adapter saves only x itself, a reference to the tensor the other adapters
(and the frozen base) read too, plus the RNG state (a few KB on the CPU, 16 bytes on CUDA). Backward restores that
state and replays `F.dropout` + `F.linear` under autograd, so the masks, the ops and therefore the gradients are
exactly those of `lora_A(dropout(x))` for the same seed (tests/test_long_context.py). Cost: one more dropout and
(T, in) x (in, r) matmul per adapter in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _DroppedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p):  # x (..., in), weight (r, in), both in the adapter dtype
        ctx.p, ctx.rng = p, _rng_state(x.device)
        ctx.save_for_backward(x, weight)
        return F.linear(F.dropout(x, p, training=True), weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad_h):
        x, weight = ctx.saved_tensors
        cpu_state, dev_state = ctx.rng
        ctx.rng = None  # the graph's nodes outlive backward while the loss is referenced: drop the 5 KB state now
        devices = [x.device] if dev_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type=x.device.type), torch.enable_grad():
            torch.set_rng_state(cpu_state)
            if dev_state is not None:
                torch.cuda.set_rng_state(dev_state, x.device)
            xr = x.detach().requires_grad_(ctx.needs_input_grad[0])
            wr = weight.detach().requires_grad_(ctx.needs_input_grad[1])
            h = F.linear(F.dropout(xr, ctx.p, training=True), wr)  # the same mask: the same RNG draws
            wanted = [t for t in (xr, wr) if t.requires_grad]
            grads = iter(torch.autograd.grad(h, wanted, grad_h)) if wanted else iter(())
        return (next(grads) if xr.requires_grad else None, next(grads) if wr.requires_grad else None, None)


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """F.linear(F.dropout(x, p, training=True), weight), saving x instead of the dropped copy and its mask."""
    return _DroppedLinear.apply(x, weight, p)
