"""K-quant GGUF types (q4_k_m, q5_k_m, q6_k) encoded by llama.cpp's own quantizer, without a llama.cpp build.

The blocks are made by ggml's `ggml_quantize_chunk` (the routine `llama-quantize` calls for every tensor, with no
importance matrix here), found in the native library of the prebuilt `xllamacpp` wheel (the `llama-cpp` extra) and
called through ctypes on row blocks of the merged fp32 weight, so the export stays streaming. The wheel does not ship
`llama_model_quantize` itself, so the per-tensor type mix that names a file "Q4_K_M" is llama.cpp's rule
(llama-quant.cpp, llama_tensor_get_type) restated here for the architectures we export (dense Llama/Mistral/Qwen2):

    q4_k_m   Q4_K everywhere; Q6_K for output.weight (token_embd when the embeddings are tied) and for attn_v and
             ffn_down of the layers use_more_bits picks (the first and last eighth, and every third in between)
    q5_k_m   the same with Q5_K
    q6_k     Q6_K everywhere
    fused    attn_qkv (Phi-3, Falcon, GPT-NeoX, GPT-2): Q5_K in q4_k_m, Q6_K in q5_k_m
    falcon   output Q8_0; ffn_down in q4_k_m: Q6_K in the first 1/16 of the layers, Q5_K where use_more_bits, else
             Q4_K
    a row length that is not a multiple of 256 (QK_K) falls back as llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0 (and to f16 when not a multiple of 32). 1-D tensors stay f32.

Not restated (they do not apply to these models): the 70B attn_v bump, the MoE and imatrix rules. Learned position
embeddings (GPT-2) stay f32, as llama.cpp's quantizer leaves them.
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


KQUANTS = {"q4_k_m": KQuant("q4_k", 15), "q5_k_m": KQuant("q5_k", 17), "q6_k": KQuant("q6_k", 18)}
BLOCK_TYPES = ("q4_k", "q5_k", "q6_k")  # the ggml block types made here (256 weights a block)
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # llama.cpp's for rows not a multiple of 256
EXTRA = 'pip install "qlora-kit[llama-cpp]" (the prebuilt xllamacpp wheel: llama.cpp\'s native library, no compile)'


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pick for the larger type: first and last eighth of the layers, every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_kind(kind: str, name: str, n_layers: int, tied: bool, arch: str = "llama") -> str:
    """The block type of one 2-D GGUF tensor (its llama.cpp name, e.g. blk.3.attn_v.weight) in a `kind` file."""
    base = KQUANTS[kind].base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "q8_0" if arch == "falcon" else "q6_k"
    medium = kind in ("q4_k_m", "q5_k_m")
    if medium and ".attn_qkv." in name:
        return "q5_k" if kind == "q4_k_m" else "q6_k"
    if medium and arch == "falcon" and ".ffn_down." in name and kind == "q4_k_m":
        i = int(name.split(".")[1])
        return "q6_k" if i < n_layers // 16 else "q5_k" if use_more_bits(i, n_layers) else "q4_k"
    if medium and (".attn_v." in name or ".ffn_down." in name):
        return "q6_k" if use_more_bits(int(name.split(".")[1]), n_layers) else base
    return base


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
    """(rows, cols) fp32 -> (rows, bytes per row) uint8 in ggml's block layout for `kind` (q4_k / q5_k / q6_k)."""
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
