"""LoRA dropout without saved dropped copies: `lora_A(dropout(x))` that saves x (shared) and at most a 1-byte mask.

`lora_A(dropout(x))` in plain autograd keeps, per adapter, the dropped copy of x (saved by lora_A's matmul) and
the dropout noise (saved by the multiply; on the CPU a (T, in) tensor in the compute dtype): for q, k, v reading the
same normed hidden state that is 3 x 2 copies of (B, S, H) where one would do. Here each adapter saves x itself, a
reference to the tensor the other adapters (and the frozen base) read too, and:

    CPU   the mask as bool (T, in), 1 byte per element. The CPU generator draws serially (~10 ns per element, one
          Mersenne-Twister draw each), which costs more than the adapter's matmuls: regenerating the mask in
          backward made a step ~20% slower at seq 2048 (bench/results/long_context_step_time.md). Drawn once per
          forward (and once in a checkpoint's recompute, like nn.Dropout), never in backward.
    CUDA  the RNG state (16 bytes); backward restores it and replays F.dropout (the fused Philox kernel, cheap),
          so nothing of size (T, in) is kept at all.

Either way the masks, the ops and therefore the gradients are bitwise those of `lora_A(dropout(x))` for the same
seed (tests/test_long_context.py): on the CPU F.dropout is `x * (empty_like(x).bernoulli_(1-p) / (1-p))`, and
bernoulli_ draws the same bits whatever the dtype it writes, so drawing into a bool tensor changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# The CPU keeps masks (see the module doc); False makes the CPU replay like CUDA (tests run that path on the CPU).
KEEP_CPU_MASKS = True


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _noise(mask: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """F.dropout's CPU noise from its bool mask: 0 or 1/(1-p), rounded to `dtype` exactly as F.dropout does."""
    return mask.to(dtype).div_(1 - p)


class _DroppedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p):  # x (..., in), weight (r, in), both in the adapter dtype
        ctx.p = p
        if x.device.type != "cpu" or not KEEP_CPU_MASKS:
            ctx.rng = _rng_state(x.device)
            ctx.save_for_backward(x, weight)
            return F.linear(F.dropout(x, p, training=True), weight)  # (..., r)
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)  # (..., in) 1 byte
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x * _noise(mask, p, x.dtype), weight)  # (..., r): F.dropout's ops, in its order

    @staticmethod
    def backward(ctx, grad_h):  # grad_h (..., r)
        saved = ctx.saved_tensors  # read once: a checkpoint unpacks each saved tensor a single time
        if len(saved) == 2:
            return _replay_backward(ctx, grad_h, *saved)
        x, weight, mask = saved
        noise = _noise(mask, ctx.p, x.dtype)
        g = grad_h.reshape(-1, grad_h.shape[-1])  # (T, r)
        # The products autograd's matmul backward computes for F.linear(dropped, weight), in the same form (mm of
        # the (T, in) fold; the weight gradient as g^T @ dropped), so the results are bitwise autograd's.
        grad_w = g.t().mm((x * noise).reshape(g.shape[0], -1)) if ctx.needs_input_grad[1] else None  # (r, in)
        grad_x = g.mm(weight).view(x.shape).mul_(noise) if ctx.needs_input_grad[0] else None  # (..., in)
        return grad_x, grad_w, None


def _replay_backward(ctx, grad_h, x, weight):
    """CUDA: restore the forward's RNG state and replay dropout + linear under autograd (the same mask)."""
    cpu_state, dev_state = ctx.rng
    ctx.rng = None  # the graph's nodes outlive backward while the loss is referenced: drop the state now
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
    """F.linear(F.dropout(x, p, training=True), weight), saving x (and on the CPU a bool mask) instead of the
    dropped copy and its noise."""
    return _DroppedLinear.apply(x, weight, p)
