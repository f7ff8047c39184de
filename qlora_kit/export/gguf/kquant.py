"""K-quant GGUF types (q2_k ... q6_k) encoded by llama.cpp's own quantizer, without a llama.cpp build, and the
per-tensor type mix of those and of mxfp4 (llama.cpp's MXFP4_MOE).

The blocks are made by ggml's `ggml_quantize_chunk` (the routine `llama-quantize` calls for every tensor, with no
importance matrix here), found in the native library of the prebuilt `xllamacpp` wheel (the `llama-cpp` extra) and
called through ctypes on row blocks of the merged fp32 weight, so the export stays streaming. The wheel does not ship
`llama_model_quantize` itself, so the per-tensor type mix that names a file "Q4_K_M" is llama.cpp's rule
(src/llama-quant.cpp: tensor_get_category, llama_tensor_get_type_impl, tensor_type_fallback) restated here; i is the
layer (read from the tensor's name), n the layer count, E the expert count (the first dimension of the 3-D ffn_*_exps
tensors, llama.cpp's expert_count), gqa = heads / kv heads, more(i) = use_more_bits (the first and last eighth of
the layers, every third in between). A tensor's category is a substring of its name, as llama.cpp matches it (no
rule names an architecture but Falcon: gpt-oss and DeepSeek have none of their own):

    output (token_embd when tied)  Q6_K (Falcon: Q8_0; rows not 256-blocks: Q8_0)
    attn_v, attn_qkv (category_is_attn_v: the fused qkv takes attn_v's rule; llama.cpp's own attn_qkv branch,
               q4_k_m: Q5_K, comes after it and is never reached)
               q2_k: Q4_K if gqa >= 4 else Q3_K; q3_k_m: Q5_K in layers 0-1, else Q4_K; q3_k_l: Q5_K;
               q4_k_m/q5_k_m: Q6_K where more(i); q4_k_s: Q5_K in layers 0-3. Then E == 8: Q8_0
    attn_k     E == 8: Q8_0
    attn_output  E == 8: Q5_K in q2_k, q3_k_s, q3_k_m, q4_k_s, q4_k_m; else q2_k: Q3_K, q3_k_m: Q4_K, q3_k_l: Q5_K
               (Falcon: q3_k_l Q4_K only)
    ffn_down   (ffn_down_exps and the shared expert's ffn_down_shexp alike, by the layer in the name; DeepSeek's
               dense first layers' ffn_down too)
               q2_k: Q3_K; q3_k_m: Q5_K in the first 1/16, else Q4_K (Falcon: Q3_K unless more(i)); q3_k_l: Q5_K
               (Falcon Q4_K); q4_k_m: Q6_K where more(i) (Falcon: Q6_K in the first 1/16, Q5_K where more(i));
               q5_k_m: Q6_K where more(i); q4_k_s: Q5_K in the first 1/8 (not Falcon)
    otherwise  the file's type: ffn_gate/up (_exps, _shexp), attn_q, untied token_embd, and DeepSeek's latent
               attention: attn_q_a, attn_q_b, attn_kv_a_mqa and the 3-D (n_head, ...) attn_k_b / attn_v_b, none of
               whose names holds "attn_v.weight" / "attn_k.weight" / "attn_kv_b.weight" (llama.cpp gives the
               fused attn_kv_b, which these files do not hold, attn_v's rules)

    kept as they are (f32 here: the merged weights are fp32): 1-D tensors (ggml counts trailing 1s out, so
    Qwen2-MoE's (1, hidden) ffn_gate_inp_shexp is one; gpt-oss's attn_sinks), names not ending in "weight" (gpt-oss's
    (E, I) expert biases, DeepSeek-V3's exp_probs_b.bias), norms, the expert router ffn_gate_inp, learned positions.
    A row length (ggml's ne[0], numpy's last dimension, per expert or head for 3-D tensors) that is not a multiple of
    256 (QK_K) falls back as llama.cpp does: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (and to f16
    when not a multiple of 32): gpt-oss's 2880-wide rows take Q5_0 in a q4_k_m file, its output Q8_0.

mxfp4 (LLAMA_FTYPE_MOSTLY_MXFP4_MOE, the type gpt-oss ships in): the output (and token_embd when tied) Q8_0; every
other quantized tensor MXFP4 if it is 3-D with more than one matrix (ggml's ne[2] > 1: the routed experts, and on
DeepSeek attn_k_b / attn_v_b too: llama.cpp matches expert roles by name for BailingMoE3 alone), else Q8_0; kept
tensors as above. llama-quantize has no fallback for MXFP4 or Q8_0 rows that are not 32-blocks (it stops); the
writer stores those f16 as it does for every type.

Not restated: the 70B-size attn_v bump (llama.cpp decides it from the model's size class) and the imatrix rules.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ExportError


@dataclass(frozen=True)
class KQuant:
    base: str  # the type of most weights
    file_type: int  # general.file_type (llama_ftype)


KQUANTS = {"q2_k": KQuant("q2_k", 10), "q3_k_s": KQuant("q3_k", 11), "q3_k_m": KQuant("q3_k", 12),
           "q3_k_l": KQuant("q3_k", 13), "q4_k_s": KQuant("q4_k", 14), "q4_k_m": KQuant("q4_k", 15),
           "q5_k_s": KQuant("q5_k", 16), "q5_k_m": KQuant("q5_k", 17), "q6_k": KQuant("q6_k", 18)}
BLOCK_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")  # the ggml block types made here (256 weights a block)
# llama.cpp's for rows not a multiple of 256
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
KEEP = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight")  # names llama.cpp's quantizer leaves as they are
EXTRA = 'pip install "qlora-kit[llama-cpp]" (the prebuilt xllamacpp wheel: llama.cpp\'s native library, no compile)'


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pick for the larger type: first and last eighth of the layers, every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_kind(kind: str, name: str, n_layers: int, tied: bool, arch: str = "llama", n_expert: int = 0,
                gqa: int = 1) -> str:
    """The block type of one 2-D GGUF tensor (its llama.cpp name, e.g. blk.3.attn_v.weight) in a `kind` file of a
    model with `n_layers` layers, `n_expert` routed experts and `gqa` query heads per kv head (module docstring)."""
    t = KQUANTS[kind].base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "q8_0" if arch == "falcon" else "q6_k"
    if not name.startswith("blk."):
        return t
    i, n, falcon, eight = int(name.split(".")[1]), n_layers, arch == "falcon", n_expert == 8
    more = use_more_bits(i, n)
    if ".attn_v." in name or ".attn_qkv." in name:  # llama.cpp's category_is_attn_v: fused qkv counts as v
        t = {"q2_k": "q4_k" if gqa >= 4 else "q3_k", "q3_k_m": "q5_k" if i < 2 else "q4_k", "q3_k_l": "q5_k",
             "q4_k_m": "q6_k" if more else t, "q5_k_m": "q6_k" if more else t,
             "q4_k_s": "q5_k" if i < 4 else t}.get(kind, t)
        return "q8_0" if eight else t
    if ".attn_k." in name:
        return "q8_0" if eight else t
    if ".attn_output." in name:
        if falcon:
            return "q4_k" if kind == "q3_k_l" else t
        if eight:
            return "q5_k" if kind in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else t
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(kind, t)
    if ".ffn_down" in name:  # ffn_down, ffn_down_exps, ffn_down_shexp
        if kind == "q4_k_m" and falcon:
            return "q6_k" if i < n // 16 else "q5_k" if more else "q4_k"
        return {"q2_k": "q3_k", "q3_k_m": "q5_k" if i < n // 16 else "q3_k" if falcon and not more else "q4_k",
                "q3_k_l": "q4_k" if falcon else "q5_k", "q4_k_m": "q6_k" if more else t,
                "q5_k_m": "q6_k" if more else t,
                "q4_k_s": "q5_k" if not falcon and i < n // 8 else t}.get(kind, t)
    return t


def mxfp4_kind(name: str, shape: tuple[int, ...], tied: bool) -> str:
    """The block type of one quantized tensor of an mxfp4 (MXFP4_MOE) file (module docstring)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "q8_0"
    return "mxfp4" if len(shape) == 3 and shape[0] > 1 else "q8_0"


def keeps_type(name: str, shape: tuple[int, ...]) -> bool:
    """A tensor llama.cpp's quantizer does not quantize: fewer than 2 dimensions once trailing 1s are dropped (ggml's
    n_dims; numpy shapes are reversed, so leading 1s here), a norm, the expert router, learned positions."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims) < 2 or name.endswith(KEEP)


def row_fallback(kind: str, cols: int) -> str:
    """A K type whose rows do not fill 256-weight blocks -> llama.cpp's replacement (still blocks of 32)."""
    return FALLBACK[kind] if kind in BLOCK_TYPES and cols % 256 else kind


def _library_path() -> Path | None:
    spec = importlib.util.find_spec("xllamacpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("xllamacpp*.so"))
    return found[0] if found else None


_quantize_chunk = None


def _ggml():
    """ggml_quantize_chunk(type, const float *src, void *dst, int64 start, int64 nrows, int64 n_per_row,
    const float *imatrix) -> bytes written, from the xllamacpp wheel's library (loaded once)."""
    global _quantize_chunk
    if _quantize_chunk is None:
        path = _library_path()
        if path is None:
            raise ExportError(f"K-quant GGUF types need llama.cpp's quantizer: {EXTRA}.")
        try:
            fn = ctypes.CDLL(str(path)).ggml_quantize_chunk
        except (OSError, AttributeError) as e:
            raise ExportError(f"the xllamacpp library at {path} has no usable ggml_quantize_chunk ({e}); "
                              f"reinstall it: {EXTRA}.") from None
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
        _quantize_chunk = fn
    return _quantize_chunk


def available() -> bool:
    return _library_path() is not None


def quantize(W: np.ndarray, kind: str) -> np.ndarray:
    """(rows, cols) fp32 -> (rows, bytes per row) uint8 in ggml's block layout for `kind` (q2_k ... q6_k, mxfp4)."""
    import gguf

    qt = getattr(gguf.GGMLQuantizationType, kind.upper())
    block, size = gguf.GGML_QUANT_SIZES[qt]
    W = np.ascontiguousarray(W, dtype=np.float32)
    rows, cols = W.shape
    out = np.empty((rows, cols // block * size), dtype=np.uint8)
    fn = _ggml()
    parts = np.array_split(np.arange(rows), max(1, min(os.cpu_count() or 1, rows // 64)))

    def part(r: np.ndarray) -> int:  # rows [r0, r1): ggml writes them at their own offset of dst
        return fn(int(qt), W.ctypes.data, out.ctypes.data, int(r[0]) * cols, len(r), cols, None) if len(r) else 0

    with ThreadPoolExecutor(len(parts)) as pool:  # ctypes releases the GIL during each call
        written = sum(pool.map(part, parts))
    if written != out.nbytes:
        raise ExportError(f"llama.cpp's quantizer wrote {written} bytes for a {rows}x{cols} {kind} tensor, "
                          f"expected {out.nbytes}.")
    return out
