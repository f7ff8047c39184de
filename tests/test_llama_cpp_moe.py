"""Mixture-of-experts GGUF run by llama.cpp itself (the xllamacpp wheel; skipped without the `llama-cpp` extra):
LoRA on the routed experts, merged and as llama.cpp's stacked adapter tensors, and K-quants with llama.cpp's
per-tensor type mix. References we did not write: transformers' forward of PEFT's merge of the adapter (its
target_parameters on the fused expert tensors), llama.cpp's own LoRA path (build_lora_mm_id on the routed experts),
and the gguf package's decoding of our K blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_models import EXPERT_GGUF, adapter, build, peft_merged
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


@pytest.mark.parametrize("name", [*EXPERT_GGUF, "gptoss"])
def test_expert_lora_merged_and_as_llama_cpp_adapter(name, tmp_path):
    """Experts-only LoRA: our merged f32 GGUF gives transformers' greedy tokens on PEFT's merge (prompts of 4, 5, 9
    tokens) and its log-probabilities to float rounding (measured under 1e-5; gpt-oss: its interleaved gate/up
    de-interleaved after the merge), and the base f32 GGUF + our adapter GGUF through llama.cpp's LoRA path gives
    the merged GGUF's tokens and log-probabilities; the adapter moves them (else llama.cpp could have skipped the
    expert pairs)."""
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


@pytest.mark.parametrize("name, kind, experts", [(n, "q4_k_m", 4) for n in EXPERT_GGUF] + [
    ("mixtral", "q4_k_m", 8), ("mixtral", "q3_k_m", 8), ("qwen2moe", "q2_k", 4)])
def test_moe_k_quant_runs_in_llama_cpp(name, kind, experts, tmp_path):
    """A K-quant GGUF of a hidden-256 MoE (experts as wide, rows filling K blocks; 8 experts: llama.cpp's Q8_0
    attn_v/attn_k and Q5_K attn_output) with LoRA on the experts merged in: ggml's own dequantizer decodes every
    quantized tensor (3-D expert stacks included) as the gguf package does, within the type's error of the f32 file;
    llama.cpp runs the file as it runs the gguf package's decoding of the same blocks (an f32 copy): the first greedy
    token is in the copy's top 5, and the log-probabilities differ by clearly less than the quantization moved them
    from the f32 file (what remains is ggml's 8-bit activations in K dot products, large on these peaked models)."""
    key = "num_local_experts" if name == "mixtral" else "num_experts"
    base = build(name, tmp_path / "base", hidden=256, config={key: experts})
    a = experts_only(name, tmp_path / "a", base)
    export(a, tmp_path / "m-f32.gguf", gguf_type="f32")
    export(a, tmp_path / f"m-{kind}.gguf", gguf_type=kind)
    ref = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "m-f32.gguf").tensors}
    r = gguf.GGUFReader(tmp_path / f"m-{kind}.gguf")
    bound = {"q2_k": 0.5, "q3_k_m": 0.25, "q4_k_m": 0.1}[kind]
    for t in r.tensors:
        W = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref[t.name].shape)
        if t.tensor_type.name not in ("F32", "F16"):
            assert np.array_equal(ggml_decoded(t), W.ravel()), (name, t.name)
        assert np.linalg.norm(W - ref[t.name]) <= bound * np.linalg.norm(ref[t.name]), (name, t.name)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert {"Q6_K", kind.split("_")[0].upper() + "_K"} <= set(types.values()), types
    assert (types["blk.0.attn_v.weight"] == "Q8_0") == (experts == 8), types
    dequantized(tmp_path / f"m-{kind}.gguf", tmp_path / "m-deq.gguf")
    srvq, srvd, srv32 = (server(tmp_path / f"m-{k}.gguf") for k in (kind, "deq", "f32"))
    banned = banned_of(base)
    err = err32 = 0.0
    same = 0
    for prompt in PROMPTS:
        tokens, lps = llama_greedy(srvq, prompt, banned)
        tokens_d, lpd = llama_greedy(srvd, prompt, banned)
        tokens_32, lp32 = llama_greedy(srv32, prompt, banned)
        assert tokens[0] in lpd[0], (name, prompt)
        same += tokens == tokens_d
        err = max(err, *(abs(v - lpd[0][i]) for i, v in lps[0].items() if i in lpd[0]))
        err32 = max(err32, *(abs(v - lp32[0][i]) for i, v in lps[0].items() if i in lp32[0]), 0.0)
    print(f"{name} ({experts} experts) {kind}: first-step max |log p| difference vs its gguf-dequantized f32 copy "
          f"{err:.2e}, vs the f32 file {err32:.2e}; {same}/{len(PROMPTS)} prompts' {len(tokens)} greedy tokens equal "
          "the copy's")
    assert err < 0.75 * err32, (name, kind, err, err32)
