"""Inference needs no second dequantization per token: the CPU fast path for `generate` and `eval`.

Training keeps each frozen weight quantized and dequantizes it inside every matmul (quant.QuantLinear): memory is
the point there. In generate/eval nothing trains, and on a CPU the per-call dequantization (bitsandbytes' blockwise
4-bit decode of every weight, for every token) costs far more than the matmul of one decoded token. So:

    densify(model)        every QuantLinear -> a frozen nn.Linear holding dequant(W_q) in the compute dtype, the
                          very values each training forward multiplied by: logits are unchanged, bit for bit
                          (tests/test_inference.py). Costs 2 bytes/weight (bf16) instead of ~0.5: skipped when
                          the dense weights would not fit comfortably in free memory, and never done on CUDA, where
                          dequantizing kernels are fast and memory is what the GPU lacks.
    merge_adapters(model) every LoRALinear over a dense base -> one nn.Linear with W + s·B@A (added in fp32, cast
                          once): one matmul instead of three per layer. Changes the rounding (the sum is bf16), so
                          generate uses it and eval does not (eval reproduces the training loss exactly).

The KV cache (transformers' DynamicCache) is on in generate: each new token attends to cached keys/values.
"""

from __future__ import annotations

import torch
from torch import nn

from . import dora, lora
from .quant import QuantLinear

HEADROOM = 0.5  # densify only when the dense weights take at most this fraction of the memory available now


def _quantized(model: nn.Module) -> list[tuple[nn.Module, str, QuantLinear]]:
    """(parent, attribute name, layer) of every QuantLinear, wherever it sits (also as an adapter's `.base`)."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, QuantLinear):
                found.append((parent, name, child))
    return found


def dense_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    return sum(q.in_features * q.out_features * (dtype or q.spec.compute_dtype).itemsize
               for _, _, q in _quantized(model))


def available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def densify(model: nn.Module, dtype: torch.dtype | None = None, force: bool = False, exact: bool = False) -> bool:
    """Replace every QuantLinear on the CPU by a frozen nn.Linear with weight dequant(W_q) in `dtype` (default:
    its compute dtype). Returns whether it did (False: nothing quantized, on CUDA, or too big for free memory).
    `exact` (eval): leave the bases of DoRA layers quantized. DoRALinear.weight_norm takes A·W^T through the
    quantized layer's own bf16 matmul but in fp32 over a plain weight, so densifying would shift a DoRA run's loss
    by ~3e-4 relative from what training computed; every other layer gives the same bits either way."""
    layers = [(parent, name, q) for parent, name, q in _quantized(model)
              if not (exact and isinstance(parent, dora.DoRALinear))]
    if not layers or any(q.qweight.is_cuda for _, _, q in layers):
        return False
    if not force and dense_bytes(model, dtype) > HEADROOM * available_bytes():
        return False
    for parent, name, q in layers:
        d = dtype or q.spec.compute_dtype
        dense = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        dense.weight = nn.Parameter(q.dequantize(d), requires_grad=False)  # (out, in) dtype d
        if q.bias is not None:
            dense.bias = nn.Parameter(q.bias.detach().to(d), requires_grad=False)
        setattr(parent, name, _Cast(dense) if d != q.spec.compute_dtype else dense)
    return True


class _Cast(nn.Module):
    """A dense layer in another dtype than the model's activations: cast in, compute, cast back (as QuantLinear)."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner, self.in_features, self.out_features = inner, inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.inner.weight.dtype)).to(x.dtype)


def merge_adapters(model: nn.Module) -> int:
    """Fold every LoRALinear (DoRALinear) whose base is a plain nn.Linear into it (W + s·B@A, or DoRA's
    m ⊙ (W + s·B@A) / ||W + s·B@A||_row, in fp32, cast to W's dtype).
    Returns how many were merged. Adapters over a still-quantized base stay as they are."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, lora.LoRALinear) and type(child.base) is nn.Linear:
                base = child.base
                A, B, W, s = child.lora_A.weight, child.lora_B.weight, base.weight, child.scaling
                with torch.no_grad():  # DoRA folds its magnitude too (dora.merge); an IA3 wrapper stays outside
                    W.copy_(dora.merge(W, A, B, s, child.lora_magnitude_vector, W.dtype)
                            if isinstance(child, dora.DoRALinear) else lora.merge(W, A, B, s, W.dtype))
                setattr(parent, name, base)
                n += 1
    return n


def for_decoding(model: nn.Module, merge: bool = True) -> str:
    """Generation on the CPU: dense weights, the whole model in fp32, a single adapter merged. fp32, not bf16:
    a decoded token is a matrix-vector product, and on the CPU measured here (AVX512-BF16, torch 2.13) torch's
    bf16 GEMV is 10-30x slower than fp32's while bf16 wins only for long prompts (bench/results/generate_speed.md).
    Returns what was done (for the log); leaves the model as it is on CUDA or when memory is short."""
    if any(p.is_cuda for p in model.parameters()):
        return "unchanged (CUDA)"
    params = sum(p.numel() for p in model.parameters()) + sum(q.in_features * q.out_features
                                                              for _, _, q in _quantized(model))
    if 4 * params > HEADROOM * available_bytes():
        return "unchanged: an fp32 copy would not fit in free memory"
    densify(model, force=True)
    model.float()  # bf16 -> fp32 is exact: the same weights, computed with more precision
    merged = merge_adapters(model) if merge else 0
    return "dense fp32" + (f", {merged} adapter modules merged" if merged else "")
