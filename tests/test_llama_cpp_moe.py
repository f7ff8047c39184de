"""Mixture-of-experts GGUF run by llama.cpp itself (the xllamacpp wheel; skipped without the `llama-cpp` extra):
LoRA on the routed experts, merged and as llama.cpp's stacked adapter tensors, K-quants with llama.cpp's
per-tensor type mix (gpt-oss and DeepSeek included), and mxfp4 (MXFP4_MOE). References we did not write:
transformers' forward of PEFT's merge of the adapter (its target_parameters on the fused expert tensors), llama.cpp's
own LoRA path (build_lora_mm_id on the routed experts), ggml's own quantizer and dequantizers, and the gguf package's
decoding of our blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_models import EXPERT_GGUF, EXPERT_LORA_GGUF, adapter, build, peft_merged
from qlora_kit.adapters import peft_format

xlc = pytest.importorskip("xllamacpp", reason="llama.cpp runtime not installed: pip install 'qlora-kit[llama-cpp]'")
gguf = pytest.importorskip("gguf")
from test_llama_cpp import hf_greedy, llama_greedy, server  # noqa: E402  (after the skip: it imports xllamacpp)
from test_llama_cpp_archs import PROMPTS, banned_of, dequantized, export  # noqa: E402


def experts_only(name: str, folder: Path, base: Path, zero: bool = False) -> Path:
    """A random LoRA on every routed expert's gate_up_proj and down_proj and nothing else (so whatever it changes,
    the experts' adapters changed); `zero`: the same with B = 0 (the base's own model)."""
    full = peft_format.load_adapter(adapter(name, folder.with_name(folder.name + "-full"), base, experts=True))
    tensors = {k: v * 0 if zero and "lora_B" in k else v for k, v in full.tensors.items() if ".experts." in k}
    return peft_format.save_adapter(folder, tensors, r=4, alpha=8.0, dropout=0.0, rslora=False, base_model=str(base))


@pytest.mark.parametrize("name", [*EXPERT_LORA_GGUF, "gptoss"])
def test_expert_lora_merged_and_as_llama_cpp_adapter(name, tmp_path):
    """Experts-only LoRA: our merged f32 GGUF gives transformers' greedy tokens on PEFT's merge (prompts of 4, 5, 9
    tokens) and its log-probabilities to float rounding (measured under 1e-5; gpt-oss: its interleaved gate/up
    de-interleaved after the merge; DeepSeek: its routed experts after the dense first layer), and the base f32 GGUF
    + our adapter GGUF through llama.cpp's LoRA path gives the merged GGUF's tokens and log-probabilities; the
    adapter moves them (else llama.cpp could have skipped the expert pairs)."""
    base = build(name, tmp_path / "base")
    a = experts_only(name, tmp_path / "a", base)
    export(a, tmp_path / "merged.gguf", gguf_type="f32")
    export(experts_only(name, tmp_path / "zero", base, zero=True), tmp_path / "base.gguf", gguf_type="f32")
    export(a, tmp_path / "lora.gguf", format="gguf-adapter", gguf_type="f32")
    banned, model = banned_of(base), peft_merged(base, a)
    merged, plain = server(tmp_path / "merged.gguf"), server(tmp_path / "base.gguf")
    with_lora = server(tmp_path / "base.gguf", tmp_path / "lora.gguf")
    err_hf = err_lora = moved = 0.0
    for prompt in PROMPTS:
        tokens, lps = llama_greedy(merged, prompt, banned)
        theirs, logps = hf_greedy(model, prompt, banned)
        assert tokens == theirs, (name, prompt)
        err_hf = max(err_hf, *(abs(v - float(lp[i])) for lp, step in zip(logps, lps) for i, v in step.items()))
        tokens_lora, lps_lora = llama_greedy(with_lora, prompt, banned)
        assert tokens_lora == tokens, (name, prompt)
        err_lora = max(err_lora, *(abs(x[i] - y.get(i, -99.0)) for x, y in zip(lps, lps_lora) for i in x))
        _, lps_base = llama_greedy(plain, prompt, banned)
        moved = max(moved, *(abs(v - lps_base[0].get(i, -99.0)) for i, v in lps[0].items()))
    print(f"{name}: merged vs transformers+PEFT max |log p| difference {err_hf:.2e}; base+lora vs merged "
          f"{err_lora:.2e}; the expert adapter moves log p by {moved:.2f}")
    assert err_hf < 1e-4 and err_lora < 2e-3 and moved > 0.05, (name, err_hf, err_lora, moved)


def ggml_decoded(t) -> np.ndarray:
    """The blocks of a quantized GGUF tensor decoded by ggml's own dequantize_row_<type> (the routine llama.cpp's
    CPU backend uses for them), from the xllamacpp wheel's library."""
    import ctypes

    from qlora_kit.export.gguf import kquant

    kind = t.tensor_type.name.lower()
    name = kind[:-1] + "K" if kind.endswith("_k") else kind  # ggml's spelling: q4_K, q8_0
    fn = getattr(ctypes.CDLL(str(kquant._library_path())), f"dequantize_row_{name}")
    fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    blocks, n = np.ascontiguousarray(t.data), int(np.prod([int(x) for x in t.shape]))
    out = np.empty(n, dtype=np.float32)
    fn(blocks.ctypes.data, out.ctypes.data, n)
    return out


EXPERTS = {"mixtral": "num_local_experts", "gptoss": "num_local_experts", "deepseek2": "n_routed_experts",
           "deepseek3": "n_routed_experts", "qwen2moe": "num_experts", "qwen3moe": "num_experts"}
# DeepSeek with a latent attention as wide as K blocks (q_a/q_b, kv_a_mqa, v_b, attn_output; k_b's 8-wide rows f16)
WIDE_MLA = {"kv_lora_rank": 256, "q_lora_rank": 256, "v_head_dim": 64}
BOUND = {"q2_k": 0.5, "q3_k_m": 0.25, "q4_k_m": 0.1, "mxfp4": 0.2}  # each tensor's error relative to its f32 norm


def quantized_vs_decoded(name: str, kind: str, tmp_path: Path, hidden: int = 256, config: dict | None = None):
    """Export `name` (a random LoRA merged: on every routed expert where the family's expert LoRA is written, else
    on its default targets) as f32 and as `kind`. ggml's own dequantizer decodes every quantized tensor (3-D stacks
    included) exactly as the gguf package does, within BOUND of the f32 file; then llama.cpp runs the `kind` file,
    the gguf package's decoding of its blocks written as an f32 GGUF, and the f32 file: the first greedy token is
    the copy's or in its top 5. Returns (tensor types,
    first-step max |log p| difference vs the decoded copy, vs the f32 file, prompts whose greedy tokens equal the
    copy's)."""
    base = build(name, tmp_path / "base", hidden=hidden, config=config)
    a = experts_only(name, tmp_path / "a", base) if name in EXPERT_GGUF else adapter(name, tmp_path / "a", base)
    export(a, tmp_path / "m-f32.gguf", gguf_type="f32")
    export(a, tmp_path / f"m-{kind}.gguf", gguf_type=kind)
    ref = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "m-f32.gguf").tensors}
    r = gguf.GGUFReader(tmp_path / f"m-{kind}.gguf")
    for t in r.tensors:
        W = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref[t.name].shape)
        if t.tensor_type.name not in ("F32", "F16"):
            assert np.array_equal(ggml_decoded(t), W.ravel()), (name, t.name)
        assert np.linalg.norm(W - ref[t.name]) <= BOUND[kind] * np.linalg.norm(ref[t.name]), (name, t.name)
    dequantized(tmp_path / f"m-{kind}.gguf", tmp_path / "m-deq.gguf")
    srvq, srvd, srv32 = (server(tmp_path / f"m-{k}.gguf") for k in (kind, "deq", "f32"))
    banned = banned_of(base)
    err = err32 = 0.0
    same = 0
    for prompt in PROMPTS:
        tokens, lps = llama_greedy(srvq, prompt, banned)
        tokens_d, lpd = llama_greedy(srvd, prompt, banned)
        _, lp32 = llama_greedy(srv32, prompt, banned)
        assert tokens[0] == tokens_d[0] or tokens[0] in lpd[0], (name, prompt)  # top 5 before the ban
        same += tokens == tokens_d
        err = max(err, *(abs(v - lpd[0][i]) for i, v in lps[0].items() if i in lpd[0]))
        err32 = max(err32, *(abs(v - lp32[0][i]) for i, v in lps[0].items() if i in lp32[0]), 0.0)
    return {t.name: t.tensor_type.name for t in r.tensors}, err, err32, same


@pytest.mark.parametrize("name, kind, experts, config", [(n, "q4_k_m", 4, {}) for n in EXPERT_GGUF] + [
    ("mixtral", "q4_k_m", 8, {}), ("mixtral", "q3_k_m", 8, {}), ("qwen2moe", "q2_k", 4, {}),
    ("gptoss", "q4_k_m", 4, {}), ("gptoss", "q2_k", 8, {"head_dim": 64}), ("deepseek2", "q4_k_m", 4, {}),
    ("deepseek2", "q3_k_m", 8, WIDE_MLA), ("deepseek3", "q4_k_m", 8, WIDE_MLA), ("deepseek3", "q2_k", 4, {})])
def test_moe_k_quant_runs_in_llama_cpp(name, kind, experts, config, tmp_path):
    """A K-quant GGUF of a hidden-256 MoE (experts as wide, rows filling K blocks; 8 experts: llama.cpp's Q8_0
    attn_v/attn_k and Q5_K attn_output; gpt-oss's fused experts, sinks and expert biases; DeepSeek's latent
    attention, dense first layer and shared experts): decoded by ggml as by the gguf package, each tensor within the
    type's error of the f32 file; llama.cpp runs the file as it runs the gguf package's decoding of the same blocks
    (an f32 copy): the first greedy token is the copy's or in its top 5, and the log-probabilities differ by clearly
    less than the quantization moved them from the f32 file (what remains is ggml's 8-bit activations in K dot
    products, large on these peaked models)."""
    types, err, err32, same = quantized_vs_decoded(name, kind, tmp_path, config={EXPERTS[name]: experts, **config})
    assert {"Q6_K", kind.split("_")[0].upper() + "_K"} <= set(types.values()), types
    for attn in ("attn_v", "attn_k"):  # DeepSeek's latent attention has neither
        assert (types.get(f"blk.0.{attn}.weight", "Q8_0") == "Q8_0") == (experts == 8 or name.startswith("deep")), types
    print(f"{name} ({experts} experts) {kind}: first-step max |log p| difference vs its gguf-dequantized f32 copy "
          f"{err:.2e}, vs the f32 file {err32:.2e}; {same}/{len(PROMPTS)} prompts' greedy tokens equal the copy's")
    assert err < 0.75 * err32, (name, kind, err, err32)


def ggml_mxfp4(W: np.ndarray) -> np.ndarray:
    """(rows, cols) fp32 -> MXFP4 blocks by ggml's own quantizer (ggml_quantize_chunk, what llama-quantize calls)."""
    from qlora_kit.export.gguf import kquant

    W = np.ascontiguousarray(W, dtype=np.float32)
    qt = gguf.GGMLQuantizationType.MXFP4
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(W.shape, qt), dtype=np.uint8)
    assert kquant._ggml()(int(qt), W.ctypes.data, out.ctypes.data, 0, W.shape[0], W.shape[1], None) == out.nbytes
    return out


def test_gguf_mxfp4_blocks_are_ggmls():
    """The gguf package's MXFP4 quantizer (what the export writes) gives ggml's bytes on random rows of every scale,
    all-zero blocks, exact powers of two and values halfway between two E2M1 levels (the tie rule)."""
    rng = np.random.default_rng(0)
    for scale in (1e-4, 0.02, 0.3, 1.0, 1e3):
        W = (rng.standard_normal((48, 2880)) * scale).astype(np.float32)
        W[0, :64] = 0.0
        W[1, :32] = 4.0
        W[2, :32] = np.arange(32) * 0.25  # amax 7.75: d 1, halves between levels 0..6
        W[3, :32] = rng.choice([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0], 32) * rng.choice([-1, 1], 32)
        W[3, 0] = 8.0
        assert np.array_equal(gguf.quants.quantize(W, gguf.GGMLQuantizationType.MXFP4), ggml_mxfp4(W)), scale


@pytest.mark.parametrize("name, config", [("gptoss", {}), ("mixtral", {}), ("qwen2moe", {}), ("qwen3moe", {}),
                                          ("deepseek2", {}), ("deepseek3", WIDE_MLA)])
def test_moe_mxfp4_runs_in_llama_cpp(name, config, tmp_path):
    """--gguf-type mxfp4 (llama.cpp's MXFP4_MOE) on tiny MoE models: every MXFP4 tensor is ggml's own quantization
    of the f32 file's and the gguf package's, the blocks decode exactly in float64 as the gguf package decodes them
    (E8M0 scale times an E2M1 level); llama.cpp runs the file as it runs that decoding written as an f32 GGUF: the
    first greedy token is the copy's or in its top 5, first-step log p within 0.5 of it (the q8_0 files' bound:
    ggml's 8-bit activations, 0.1-0.2 on these peaked models, for the Q8_0 and MXFP4 dot products alike) and, where
    MXFP4 moved log p clearly past that (by more than 0.3 from the f32 file), clearly closer to the copy than to the
    f32 file."""
    types, err, err32, same = quantized_vs_decoded(name, "mxfp4", tmp_path, hidden=64, config=config)
    assert "MXFP4" in types.values() and "Q8_0" in types.values(), types
    ref = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "m-f32.gguf").tensors}
    for t in gguf.GGUFReader(tmp_path / "m-mxfp4.gguf").tensors:
        if t.tensor_type.name == "MXFP4":
            W = ref[t.name].reshape(-1, ref[t.name].shape[-1])
            assert np.array_equal(ggml_mxfp4(W).ravel(), np.asarray(t.data).ravel()), t.name
            # what the export writes without the llama-cpp extra
            assert np.array_equal(gguf.quants.quantize(W, t.tensor_type).ravel(), np.asarray(t.data).ravel()), t.name
            blocks = np.asarray(t.data).reshape(-1, 17)
            levels = np.array(gguf.quants.MXFP4.kvalues, dtype=np.float64)
            scale = np.ldexp(1.0, blocks[:, :1].astype(np.int64) - 128)  # E8M0 halved: 2^(e - 127) / 2
            codes = np.stack([blocks[:, 1:] & 15, blocks[:, 1:] >> 4], 1).reshape(len(blocks), 32)
            exact = scale * levels[codes]
            assert np.array_equal(exact.ravel(), gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
                                  .ravel()), t.name
    print(f"{name} mxfp4: first-step max |log p| difference vs its gguf-dequantized f32 copy {err:.2e}, vs the f32 "
          f"file {err32:.2e}; {same}/{len(PROMPTS)} prompts' greedy tokens equal the copy's")
    assert err < 0.5 and (err < 0.75 * err32 or err32 <= 0.3), (name, err, err32)


