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

    for_decoding(model)   generation: dense, fp32 activations, a single adapter merged, and on an AVX-512 CPU every
                          Linear's weight stored in fp16 (HalfLinear): a decoded token is a matrix-vector product,
                          bound by reading the weights, so half the bytes is about twice the tokens/s.

The KV cache (transformers' DynamicCache) is on in generate: each new token attends to cached keys/values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import dora, lora
from ..quant.bnb import QuantLinear

HEADROOM = 0.5  # densify only when the dense weights take at most this fraction of the memory available now
DECODE_DTYPES = ("auto", "fp16", "fp32")
# Up to this many rows (batch x new tokens) torch's fp16 F.linear on the CPU beats fp32 (a GEMV: 2.5x at 1 row,
# 1.3x at 2 on the 2-core EPYC measured); from 4 rows on it is a slow GEMM (3.4x slower than fp32 at 38 rows,
# the prompt), so larger inputs are computed in fp32 from the same fp16 weights.
FP16_MAX_ROWS = 2


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
    # the residual stream's dtype (model.dtype), which need not be the compute dtype (quant.compute_dtype fp32
    # over a bf16 model): QuantLinear casts in and out, so the dense layer must too
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    act = emb.weight.dtype if emb is not None else None
    for parent, name, q in layers:
        d = dtype or q.spec.compute_dtype
        dense = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        dense.weight = nn.Parameter(q.dequantize(d), requires_grad=False)  # (out, in) dtype d
        if q.bias is not None:
            dense.bias = nn.Parameter(q.bias.detach().to(d), requires_grad=False)
        setattr(parent, name, _Cast(dense) if d != (act or q.spec.compute_dtype) else dense)
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


class HalfLinear(nn.Module):
    """A frozen Linear for decoding on the CPU: weight (out, in) stored in fp16, activations fp32 outside.

    A base weight is a dequantized bf16 value, and fp16 holds every bf16 value in [2^-14, 65504] exactly (3 more
    mantissa bits, 3 fewer exponent bits): only weights below 6.1e-5 in magnitude round (test_inference.py checks
    all 65,536 bf16 values; bench/generate_speed.py counts the rounded ones on the demo model). A merged
    W + s·B·A (fp32) rounds to fp16's 11 bits, finer than bf16's 8. A decoded token's input (<= FP16_MAX_ROWS
    rows) is rounded to fp16 (finer than the bf16 that training multiplies in) and multiplied by torch's fp16
    F.linear, which accumulates in fp32 on this CPU (its error vs float64 is the output's fp16 rounding: tested);
    the result comes back as fp32. If that overflows fp16's range (|x| or |y| > 65504: some models carry such
    activations), or for longer inputs (the prompt), the same weights are multiplied in fp32 instead."""

    def __init__(self, dense: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.weight = nn.Parameter(dense.weight.detach().to(torch.float16), requires_grad=False)  # (out, in)
        self.bias = (None if dense.bias is None else
                     nn.Parameter(dense.bias.detach().float(), requires_grad=False))  # (out,) fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) fp32 -> (..., out) fp32
        if x.shape[:-1].numel() <= FP16_MAX_ROWS:
            y = F.linear(x.to(torch.float16), self.weight).to(x.dtype)
            # any inf/nan makes the fp32 sum non-finite, and finite entries (<= 65504 each) cannot overflow it: one
            # reduction instead of isfinite's abs, ne and all (~3 ms of a 34 ms token on the demo model)
            if math.isfinite(float(y.sum())):
                return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def halve_linears(model: nn.Module) -> int:
    """Every plain nn.Linear -> HalfLinear (adapters over them call base(x) and keep working). Returns the count."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, HalfLinear(child))
                n += 1
    return n


def fp16_decodes_faster() -> bool:
    """fp16 weights are the default only where measured faster: an AVX-512 CPU (torch's fp16 GEMV; 1.5-1.7x
    fp32's tokens/s end to end on the EPYC of bench/results/generate_speed.md). Elsewhere fp32: not measured."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def for_decoding(model: nn.Module, merge: bool = True, dtype: str = "auto") -> str:
    """Generation on the CPU: dense weights, activations in fp32, a single adapter merged; with dtype fp16 (auto:
    on an AVX-512 CPU) every Linear's weight then stored in fp16 (HalfLinear). fp32 activations, not bf16: on the
    CPU measured here (AVX512-BF16, torch 2.13) torch's bf16 F.linear GEMV is several times slower than
    fp32's.
    Returns what was done (for the log); leaves the model as it is on CUDA or when memory is short."""
    if dtype not in DECODE_DTYPES:
        raise ValueError(f"decode dtype {dtype!r}: expected one of {', '.join(DECODE_DTYPES)}")
    if any(p.is_cuda for p in model.parameters()):
        return "unchanged (CUDA)"
    params = sum(p.numel() for p in model.parameters()) + sum(q.in_features * q.out_features
                                                              for _, _, q in _quantized(model))
    if 4 * params > HEADROOM * available_bytes():
        return "unchanged: an fp32 copy would not fit in free memory"
    densify(model, force=True)
    model.float()  # bf16 -> fp32 is exact: the same weights, computed with more precision
    for parent in list(model.modules()):  # every weight is fp32 now: a _Cast is a no-op, and merging needs a Linear
        for name, child in list(parent.named_children()):
            if isinstance(child, _Cast):
                setattr(parent, name, child.inner)
    merged = merge_adapters(model) if merge else 0
    half = dtype == "fp16" or (dtype == "auto" and fp16_decodes_faster())
    halved = halve_linears(model) if half else 0
    return ("dense fp32" + (f", {merged} adapter modules merged" if merged else "")
            + (f", {halved} Linear weights in fp16" if halved else ""))
