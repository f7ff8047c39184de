"""Quantized frozen weights: the ONLY module that imports bitsandbytes.

A quantized weight is a value (packed codes + scales) held in buffers of `QuantLinear`; the full-precision weight
exists only transiently inside one matmul (QLoRA, Dettmers et al. 2023, arXiv 2305.14314):

    y = x @ dequant(W_q)^T          forward: dequantize, matmul, free
    dx = dy @ dequant(W_q)          backward: dequantize again instead of saving the (out, in) bf16 weight

We deliberately do not use `bnb.nn.Linear4bit` (docs/ARCHITECTURE.md, "bitsandbytes hazards"):
- its CPU eval forward under no_grad repacks the weight into a CPU-only layout on AVX512-BF16 machines, after
  which training silently gets no gradient through the layer; we only call the functional API;
- native CPU `dequantize_4bit` is wrong when in_features is not a multiple of the blocksize, so on the CPU we
  take the native path only for aligned shapes and dequantize in plain torch otherwise (both are tested against a
  float64 reference).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu as quant4_cpu
from ..errors import ConfigError
from ..terms import NESTED_BLOCKSIZE, QUANTIZED_TYPES, QuantType

# On AVX512-BF16 CPUs, importing bitsandbytes asks the `kernels` package for a compiled gemm kernel from the
# Hugging Face Hub: executable code from the network (or, offline, a notice on stderr from `kernels`). We never call
# that kernel (only the functional API, whose dequantize + matmul we control), so bitsandbytes is imported with
# `kernels` unimportable (a None entry in sys.modules makes `import kernels` raise ImportError, which bitsandbytes
# catches), and its own warning about the missing kernel is silenced; both are restored afterwards. Imported by
# someone else first (transformers' bitsandbytes integration in a user's script), bitsandbytes has already tried the
# fetch and printed "Failed to load CPU gemm_4bit_forward ..."; harmless here, and explained in the README ("When
# things go wrong"). Every qlora-kit command reaches bitsandbytes through this module first (tests/test_cli_quiet.py).
_log = logging.getLogger("bitsandbytes")
_level = _log.level
_log.setLevel(logging.ERROR)
_kernels = sys.modules.get("kernels", _log)  # _log: a sentinel for "was not imported"
sys.modules["kernels"] = None
try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # a broken or missing install must not stop quant.type none (plain LoRA)
    bnb = bnbF = None
    _IMPORT_ERROR = e
finally:
    _log.setLevel(_level)
    if _kernels is _log:
        del sys.modules["kernels"]
    else:
        sys.modules["kernels"] = _kernels


def _need_bnb(what: str) -> None:
    if bnb is None:
        raise ConfigError(f"{what} needs bitsandbytes, which cannot be imported here ({_IMPORT_ERROR}). Install it "
                          "(pip install bitsandbytes), or use quant.type=none and train.optimizer=adamw.")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class QuantSpec:
    type: QuantType = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_config(cls, cfg) -> "QuantSpec":  # cfg: config.QuantConfig (duck-typed; config imports no torch)
        return cls(cfg.type, cfg.blocksize, cfg.double_quant, DTYPES[cfg.compute_dtype])


def bitsandbytes_version() -> str | None:
    return bnb.__version__ if bnb is not None else None


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is stored quantized. No trainable parameters.

    The quantized tensors are frozen nn.Parameters (requires_grad=False), not buffers, so that FSDP2's
    `fully_shard` shards them like any parameter (it leaves buffers whole on every rank); `.to()` moves them like
    any parameter, never through bitsandbytes side effects. They are not saved in `state_dict()` by anything here:
    export re-quantizes from the original weights. `quant_tensors()` names them:
      nf4/fp4: qweight (numel/2, 1) uint8, two 4-bit codes per byte; code (16,) fp32 codebook;
               absmax (n_blocks,) fp32, or uint8 + nested_absmax (ceil(n_blocks/256),) fp32 + nested_code (256,)
               fp32 + offset (1,) fp32 with double quantization (1-d: FSDP2 cannot shard a 0-d tensor).
      int8:    qweight (out, in) int8; scale (out,) fp32 row absmax (W ~= qweight * scale / 127).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: torch.Tensor | None = None):
        super().__init__()
        if spec.type not in QUANTIZED_TYPES:
            raise ValueError(f"QuantLinear needs nf4, fp4 or int8, got {spec.type!r}")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize a (out, in) weight on its own device (quantize on the GPU when the weight is there)."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, spec, bias)
        for name, t in quantize(weight, spec).items():
            layer.register_parameter(name, nn.Parameter(t, requires_grad=False))
        return layer

    def quant_tensors(self) -> dict[str, torch.Tensor]:
        """name -> tensor of the quantized weight, read at call time: under FSDP2 these are the gathered (full)
        tensors while the layer runs forward or backward, and this rank's shards in between."""
        return {k: v for k, v in self._parameters.items() if k != "bias" and v is not None}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: compute dtype): exactly what every forward multiplies by."""
        return dequantize(self.quant_tensors(), self.spec, (self.out_features, self.in_features),
                          dtype or self.spec.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.spec.compute_dtype
        if GEMV_DECODE and x.is_cuda and not torch.is_grad_enabled() and self.spec.type != "int8" \
                and x.numel() == x.shape[-1]:
            return gemv_4bit(x.to(cd), self).to(x.dtype)  # batch-1 decoding: never the full (out, in) weight
        y = _DequantMatmul.apply(x.to(cd), self)
        if self.bias is not None:
            y = y + self.bias.to(cd)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        dq = ", double_quant" if s.double_quant and s.type != "int8" else ""
        bs = f", blocksize={s.blocksize}" if s.type != "int8" else ""
        return f"in={self.in_features}, out={self.out_features}, {s.type}{bs}{dq}, compute={str(s.compute_dtype)[6:]}"


GEMV_DECODE = True  # batch-1 decoding on CUDA through bitsandbytes' 4-bit GEMV (bench/gpu_check.py compares both)


def gemv_4bit(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """x (..., in) with ONE row, compute dtype -> (..., out): bitsandbytes' fused 4-bit GEMV reads the packed codes
    directly (kgemm_4bit_inference), where dequantize + matmul would write and read the whole (out, in) weight in
    16-bit for every token. `bnb.matmul_4bit` takes this path for a single row without grad; for an in_features
    that is not a multiple of the blocksize it falls back to dequantize + matmul itself."""
    tensors = layer.quant_tensors()
    state = quant_state(tensors, layer.spec, (layer.out_features, layer.in_features), x.dtype)
    return bnb.matmul_4bit(x, tensors["qweight"].t(), quant_state=state, bias=layer.bias)


class _DequantMatmul(torch.autograd.Function):
    """x @ W^T with W dequantized on the fly in forward AND backward, so autograd never keeps the (out, in)
    full-precision weight alive between them (it would cost 2 bytes/weight per layer: the whole model in bf16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # x (..., in) compute dtype
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (..., out)
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None  # (..., in); W is frozen, so no weight gradient


# ---- pure functions over tensors -------------------------------------------------------------------------------


def quantize(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """(out, in) float weight -> the buffers listed in QuantLinear's docstring."""
    _need_bnb(f"quant.type {spec.type}")
    if spec.type == "int8":
        return int8_quantize(weight)
    if weight.is_cuda or not fast_cpu_quantizer:
        q, st = bnbF.quantize_4bit(
            weight.contiguous(), blocksize=spec.blocksize, quant_type=spec.type, compress_statistics=spec.double_quant
        )
        out = {"qweight": q, "code": st.code.float()}
        if st.nested:
            out |= {"absmax": st.absmax, "nested_absmax": st.state2.absmax.float(),
                    "nested_code": st.state2.code.float(), "offset": st.offset.float().reshape(1)}
        else:
            out["absmax"] = st.absmax.float()
        return out
    # CPU: the codes and per-block absmax from quant4_cpu (bitsandbytes' arithmetic, chunked and threaded; bit for
    # bit the same), then bitsandbytes' own double quantization of the (numel/blocksize,) absmax, as
    # `bnbF.quantize_4bit(compress_statistics=True)` does it: absmax - mean, 8-bit blockwise in blocks of 256.
    code = bnbF.get_4bit_type(spec.type, device="cpu")
    q, absmax = quant4_cpu.quantize_4bit(weight, spec.blocksize, code)
    out = {"qweight": q, "code": code.float()}
    if spec.double_quant:
        offset = absmax.mean()
        qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        out |= {"absmax": qabsmax, "nested_absmax": state2.absmax.float(), "nested_code": state2.code.float(),
                "offset": offset.float().reshape(1)}
    else:
        out["absmax"] = absmax
    return out


fast_cpu_quantizer = True
"""CPU 4-bit codes through quant4_cpu (identical results); False: bitsandbytes' own CPU kernel (benchmarks, tests)."""


def dequantize(buffers: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    if spec.type == "int8":
        return int8_dequantize(buffers["qweight"], buffers["scale"], dtype).view(shape)
    native = buffers["qweight"].is_cuda or shape[1] % spec.blocksize == 0  # CPU native needs alignment
    if native:
        return bnbF.dequantize_4bit(buffers["qweight"], quant_state(buffers, spec, shape, dtype)).view(shape)
    return _dequantize_4bit_torch(buffers, spec, shape, dtype)


def int8_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLM.int8 row-wise absmax codes, computed in fp32 in plain torch so every device gives the same codes.
    (bitsandbytes' CUDA `int8_vectorwise_quant` wants fp16 input, which rounds the weight and its row scale first.)
    Same formula as bitsandbytes' CPU kernel: q = round(W * (127 / absmax_row)), ties to even.
    weight (out, in) any float dtype -> qweight (out, in) int8, scale (out,) fp32 (bitsandbytes' SCB)."""
    w = weight.float()
    scale = w.abs().amax(dim=1)  # (out,) fp32
    inv = torch.where(scale > 0, 127.0 / scale, torch.zeros_like(scale))  # an all-zero row gets codes 0, not NaN
    return {"qweight": torch.round(w * inv[:, None]).to(torch.int8), "scale": scale}


def int8_dequantize(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qweight * scale / 127 in fp32, rounded once to `dtype` (not scale/127 rounded to bf16 first)."""
    return (qweight.float() * (scale.float() / 127)[:, None]).to(dtype)


def block_absmax(buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n_blocks,) fp32 absmax per block, undoing double quantization in plain torch."""
    absmax = buffers["absmax"]
    if "nested_absmax" not in buffers:
        return absmax.float()
    vals = buffers["nested_code"][absmax.long()]  # (n_blocks,) fp32 in [-1, 1]
    n = vals.numel()
    pad = (-n) % NESTED_BLOCKSIZE
    vals = F.pad(vals, (0, pad)).view(-1, NESTED_BLOCKSIZE) * buffers["nested_absmax"][:, None]
    return vals.reshape(-1)[:n] + buffers["offset"].reshape(())


def _dequantize_4bit_torch(buffers, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Reference-correct 4-bit dequantization for any shape: codes are packed high nibble first, blocks run over
    the flattened weight (so a block may straddle two rows when in_features % blocksize != 0)."""
    packed = buffers["qweight"].view(-1)  # (numel/2,) uint8
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1).long()  # (numel,) in [0, 16)
    vals = buffers["code"][codes]  # (numel,) fp32
    numel = shape[0] * shape[1]
    pad = (-numel) % spec.blocksize
    vals = F.pad(vals[:numel], (0, pad)).view(-1, spec.blocksize) * block_absmax(buffers)[:, None]
    return vals.reshape(-1)[:numel].view(shape).to(dtype)


def quant_state(buffers, spec: QuantSpec, shape, dtype: torch.dtype) -> "bnbF.QuantState":
    """A bitsandbytes QuantState over our buffers (for the native kernels and for the on-disk serialisation)."""
    state2 = None
    if "nested_absmax" in buffers:
        state2 = bnbF.QuantState(absmax=buffers["nested_absmax"], code=buffers["nested_code"],
                                 blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return bnbF.QuantState(
        absmax=buffers["absmax"], shape=torch.Size(shape), code=buffers["code"], blocksize=spec.blocksize,
        quant_type=spec.type, dtype=dtype, offset=None if "offset" not in buffers else buffers["offset"].reshape(()),
        state2=state2,
    )


def roundtrip(weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequant(quant(W)): the base weight the adapter was trained against (for merges and analysis)."""
    if spec.type == "none":
        return weight.to(dtype)
    return dequantize(quantize(weight, spec), spec, tuple(weight.shape), dtype)


# ---- optimizers (bitsandbytes ones live here so no other module imports it) ---------------------------------------


def bnb_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """8-bit and paged AdamW from bitsandbytes. Paged optimizers need CUDA unified memory."""
    _need_bnb(f"train.optimizer {name}")
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


# bitsandbytes pages a state tensor only from this many elements (Optimizer8bit.get_state_buffer)
PAGED_MIN_NUMEL = 100_000


def repage_optimizer_state(opt: torch.optim.Optimizer) -> int:
    """After `load_state_dict`, a paged bitsandbytes optimizer holds its state as ordinary device tensors
    (Optimizer8bit.load_state_dict copies them), silently giving up paging: move each large state tensor back
    into CUDA unified memory, as the optimizer's own first step would have allocated it. Returns how many were
    re-paged (0 for torch optimizers, non-paged ones and the CPU)."""
    if bnb is None or not getattr(opt, "is_paged", False):
        return 0
    n = 0
    for state in opt.state.values():
        for key in ("state1", "state2"):
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.is_cuda and not getattr(t, "is_paged", False) \
                    and t.numel() >= PAGED_MIN_NUMEL:
                paged = bnbF.get_paged(*t.shape, dtype=t.dtype, device=t.device)
                paged.copy_(t)
                opt.page_mng.paged_tensors.append(paged)
                state[key] = paged
                n += 1
    return n


def is_paged(t: torch.Tensor) -> bool:
    return bool(getattr(t, "is_paged", False))


# ---- serialisation for export (bitsandbytes/transformers on-disk format) ----------------------------------------


def serialized_shapes(shape: tuple[int, int], spec: QuantSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of what `serialize` returns for an (out, in) weight, minus the 4-bit quant-state
    JSON blob (its length is known only once quantized). Lets an export lay out its shards before computing."""
    out_f, in_f = shape
    if spec.type == "int8":
        return {"weight": (torch.int8, (out_f, in_f)), "SCB": (torch.float32, (out_f,)),
                "weight_format": (torch.uint8, ())}
    n = out_f * in_f
    blocks = -(-n // spec.blocksize)
    d = {"weight": (torch.uint8, ((n + 1) // 2, 1)), "weight.quant_map": (torch.float32, (16,))}
    if spec.double_quant:
        d |= {"weight.absmax": (torch.uint8, (blocks,)),
              "weight.nested_absmax": (torch.float32, (-(-blocks // NESTED_BLOCKSIZE),)),
              "weight.nested_quant_map": (torch.float32, (256,))}
    else:
        d["weight.absmax"] = (torch.float32, (blocks,))
    return d


def quant_state_key(spec: QuantSpec) -> str | None:
    """Suffix of the 4-bit quant-state JSON blob (uint8 tensor); None for int8."""
    return None if spec.type == "int8" else f"weight.quant_state.bitsandbytes__{spec.type}"


def serialize(weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors transformers' bitsandbytes integration saves for one quantized Linear, keyed by their suffix
    after the module name (what `Linear4bit._save_to_state_dict` / `QuantState.as_dict(packed=True)` write):
      4-bit: weight (numel/2, 1) uint8 packed codes; weight.absmax; weight.quant_map (16,) fp32; with double
             quantization weight.nested_absmax, weight.nested_quant_map; weight.quant_state.bitsandbytes__<type>
             (uint8 JSON: blocksize, shape, dtype = `dtype`, the dtype it dequantizes to, nested offset...);
      int8:  weight (out, in) int8; SCB (out,) fp32 row absmax; weight_format () uint8 0 (row-major)."""
    return serialized(quantize(weight, spec), spec, tuple(weight.shape), dtype)


def serialized(buffers: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int],
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`serialize` of a weight already quantized (QuantLinear's tensors, e.g. a pre-quantized base's stored codes)."""
    if spec.type == "int8":
        return {"weight": buffers["qweight"], "SCB": buffers["scale"],
                "weight_format": torch.zeros((), dtype=torch.uint8)}
    state = quant_state(buffers, spec, shape, dtype)
    return {"weight": buffers["qweight"], **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def as_stored_on_cpu(model: nn.Module) -> int:
    """Make transformers-loaded bitsandbytes 4-bit layers compute what their file stores: on a CPU with AVX512-BF16,
    bitsandbytes' Linear4bit repacks its weight at the first inference forward and multiplies through a bf16 kernel
    instead of dequant(Q) in the compute dtype (0.03 max error on a (64, 64) layer here); with this off it is
    dequant(Q) @ x as in training. Returns the layers changed."""
    if bnb is None:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)
