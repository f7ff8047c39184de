"""The GGUF type mix of gpt-oss and DeepSeek-V2/V3 (K-quants and mxfp4) and of a fused qkv, checked without llama.cpp
(tests/test_llama_cpp_moe.py runs the files in llama.cpp). Every table below is derived by hand from llama.cpp's
src/llama-quant.cpp (commit 007dbbf): tensor_allows_quantization (what stays as it is), tensor_get_category (a
tensor's rule by a substring of its name: attn_k_b / attn_v_b / attn_kv_a_mqa / attn_q_a / attn_q_b hold none of
"attn_v.weight", "attn_k.weight", "attn_kv_b.weight", "attn_q.weight"), llama_tensor_get_type_impl (the per-ftype
rules: n_expert == 8's Q8_0 attn_v/attn_k and Q5_K attn_output, ffn_down by the layer in the name, MXFP4_MOE's
ne[2] > 1) and tensor_type_fallback (rows that are not 256-blocks). 4-layer models: use_more_bits(i, 4) picks
layers 2 and 3; n/16 and n/8 are 0."""

from __future__ import annotations

import pytest

from gguf_models import adapter, build
from qlora_kit.errors import ExportError
from test_gguf_moe import F32, MORE, assert_types, planned_types
from test_gguf_bigmoe import export  # (test_llama_cpp_archs has the same helper but skips without llama.cpp)

gguf = pytest.importorskip("gguf")
L4 = {"num_hidden_layers": 4}
DOWN = ("ffn_down", "ffn_down_exps", "ffn_down_shexp")  # one rule: DeepSeek's dense first layer, experts, shared


LITE_MORE = {0, 1, 2, 5, 8, 11, 14, 17, 20, 22, 23, 24, 25}


def down(t) -> dict:
    return dict.fromkeys(DOWN, t)


# name -> (model, hidden, config overrides, {file type: (base type, {tensor: type, or one per layer})})
CASES = {
    # 8 experts, rows of 256: attn_v/attn_k Q8_0 in every K type, attn_output Q5_K in q2_k..q4_k_m (not q3_k_l);
    # the sinks are 1-D (kept), the (E, I) expert biases are not weights (kept)
    "gpt-oss, 8 experts": ("gptoss", 256, L4 | {"num_local_experts": 8, "head_dim": 64}, {
        "q4_k_m": ("Q4_K", {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "attn_output": "Q5_K",
                            "ffn_down_exps": MORE, "attn_sinks": F32}),
        "q2_k": ("Q2_K", {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "attn_output": "Q5_K",
                          "ffn_down_exps": "Q3_K", "attn_sinks": F32}),
        "q3_k_m": ("Q3_K", {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "attn_output": "Q5_K",
                            "ffn_down_exps": "Q4_K", "attn_sinks": F32}),
        "q3_k_l": ("Q3_K", {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "ffn_down_exps": "Q5_K",
                            "attn_sinks": F32}),
        "q5_k_m": ("Q5_K", {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "ffn_down_exps": MORE,
                            "attn_sinks": F32}),
        "q6_k": ("Q6_K", {"attn_v": "Q8_0", "attn_k": "Q8_0", "attn_sinks": F32}),
        "mxfp4": ("Q8_0", {"ffn_gate_exps": "MXFP4", "ffn_up_exps": "MXFP4", "ffn_down_exps": "MXFP4",
                           "attn_sinks": F32}),
    }),
    # gpt-oss's 2880 is not a multiple of 256 (but of 32): 320 here, so every K type falls back per row (Q4_K ->
    # Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, Q5_K -> Q5_1), the output straight to Q8_0; 4 experts, gqa 2
    "gpt-oss, 2880-like rows": ("gptoss", 320, L4, {
        "q4_k_m": ("Q5_0", {"output": "Q8_0", "attn_v": ("Q5_0", "Q5_0", "Q8_0", "Q8_0"),
                            "ffn_down_exps": ("Q5_0", "Q5_0", "Q8_0", "Q8_0"), "attn_sinks": F32}),
        "q2_k": ("Q4_0", {"output": "Q8_0", "attn_sinks": F32}),
        "q5_k_m": ("Q5_1", {"output": "Q8_0", "attn_v": ("Q5_1", "Q5_1", "Q8_0", "Q8_0"),
                            "ffn_down_exps": ("Q5_1", "Q5_1", "Q8_0", "Q8_0"), "attn_sinks": F32}),
        "mxfp4": ("Q8_0", {"ffn_gate_exps": "MXFP4", "ffn_up_exps": "MXFP4", "ffn_down_exps": "MXFP4",
                           "attn_sinks": F32}),
    }),
    # DeepSeek-V3 with a latent attention as wide as K blocks and 8 experts: the latent tensors take the base type
    # (no attn_v rule reaches them), attn_output the 8-expert Q5_K; ffn_down of the dense layer 0, of the experts
    # and of the shared expert one rule; MXFP4_MOE makes the 3-D (n_head, ...) attn_k_b / attn_v_b MXFP4 too
    "DeepSeek-V3, 8 experts": ("deepseek3", 256, L4 | {"n_routed_experts": 8, "kv_lora_rank": 256, "q_lora_rank": 256,
                                                       "qk_nope_head_dim": 256, "v_head_dim": 64}, {
        "q4_k_m": ("Q4_K", {"output": "Q6_K", "attn_output": "Q5_K", **down(MORE)}),
        "q2_k": ("Q2_K", {"output": "Q6_K", "attn_output": "Q5_K", **down("Q3_K")}),
        "q3_k_m": ("Q3_K", {"output": "Q6_K", "attn_output": "Q5_K", **down("Q4_K")}),
        "q3_k_l": ("Q3_K", {"output": "Q6_K", **down("Q5_K")}),
        "q4_k_s": ("Q4_K", {"output": "Q6_K", "attn_output": "Q5_K"}),
        "q5_k_s": ("Q5_K", {"output": "Q6_K"}),
        "mxfp4": ("Q8_0", {"ffn_gate_exps": "MXFP4", "ffn_up_exps": "MXFP4", "ffn_down_exps": "MXFP4",
                           "attn_k_b": "MXFP4", "attn_v_b": "MXFP4"}),
    }),
    # DeepSeek-V2 with the tiny latent sizes (k_b rows 8 wide: not even 32-blocks, F16; q_b, v_b, attn_output rows
    # 32/64 wide: the 32-block fallbacks), 4 experts (attn_output's plain rules)
    "DeepSeek-V2, narrow latent": ("deepseek2", 256, L4, {
        "q4_k_m": ("Q4_K", {"output": "Q6_K", "attn_q_b": "Q5_0", "attn_k_b": "F16", "attn_v_b": "Q5_0",
                            "attn_output": "Q5_0", **down(MORE)}),
        "q2_k": ("Q2_K", {"output": "Q6_K", "attn_q_b": "Q4_0", "attn_k_b": "F16", "attn_v_b": "Q4_0",
                          "attn_output": "Q4_0", **down("Q3_K")}),
        "q3_k_m": ("Q3_K", {"output": "Q6_K", "attn_q_b": "Q4_0", "attn_k_b": "F16", "attn_v_b": "Q4_0",
                            "attn_output": "Q5_0", **down("Q4_K")}),
        "mxfp4": ("Q8_0", {"ffn_gate_exps": "MXFP4", "ffn_up_exps": "MXFP4", "ffn_down_exps": "MXFP4",
                           "attn_k_b": "F16", "attn_v_b": "MXFP4"}),
    }),
    # V2-Lite (no q LoRA rank: attn_q, the file's type), 26 layers, hidden 64 (every row falls back: Q4_K -> Q5_0,
    # Q6_K -> Q8_0): use_more_bits(i, 26) is i < 3, i >= 22, or (i - 3) % 3 == 2
    "DeepSeek-V2-Lite": ("deepseek2-lite", 64, {}, {
        "q4_k_m": ("Q5_0", {"output": "Q8_0", "attn_k_b": "F16",
                            **down(tuple("Q8_0" if i in LITE_MORE else "Q5_0" for i in range(26)))}),
    }),
    # a dense model with a fused attn_qkv (Phi-3): category_is_attn_v gives it attn_v's rule (llama.cpp's own
    # attn_qkv branch, q4_k_m Q5_K, comes after that one and is never reached); gqa 1
    "Phi-3, fused qkv": ("phi3", 256, L4, {
        "q4_k_m": ("Q4_K", {"output": "Q6_K", "attn_qkv": MORE, "ffn_down": MORE}),
        "q3_k_m": ("Q3_K", {"output": "Q6_K", "attn_qkv": ("Q5_K", "Q5_K", "Q4_K", "Q4_K"), "attn_output": "Q4_K",
                            "ffn_down": "Q4_K"}),
        "q2_k": ("Q2_K", {"output": "Q6_K", "attn_qkv": "Q3_K", "attn_output": "Q3_K", "ffn_down": "Q3_K"}),
    }),
    # mxfp4 on another MoE family: the shared expert and its (1, hidden) gate are not 3-D (Q8_0, kept)
    "Qwen2-MoE": ("qwen2moe", 64, {}, {
        "mxfp4": ("Q8_0", {"ffn_gate_exps": "MXFP4", "ffn_up_exps": "MXFP4", "ffn_down_exps": "MXFP4"}),
    }),
}


@pytest.mark.parametrize("case", list(CASES))
def test_types_are_llama_quants(case, tmp_path):
    name, hidden, overrides, table = CASES[case]
    base = build(name, tmp_path / "base", hidden=hidden, config=overrides)
    for kind, (default, rules) in table.items():
        assert_types(case, kind, planned_types(base, kind), rules, default)


def test_mxfp4_file(tmp_path):
    """An mxfp4 gpt-oss GGUF: file type MOSTLY_MXFP4_MOE (38), each expert stack MXFP4 blocks that decode to
    within 4-bit error of the f32 file's (the gguf package's dequantizer), the Q8_0 tensors likewise."""
    import numpy as np

    base = build("gptoss", tmp_path / "base")
    a = adapter("gptoss", tmp_path / "a", base)
    export(a, tmp_path / "f32.gguf", gguf_type="f32")
    export(a, tmp_path / "mx.gguf", gguf_type="mxfp4")
    ref = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "f32.gguf").tensors}
    r = gguf.GGUFReader(tmp_path / "mx.gguf")
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE) == 38
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.ffn_down_exps.weight"] == "MXFP4" and types["blk.1.attn_q.weight"] == "Q8_0", types
    for t in r.tensors:
        W = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref[t.name].shape)
        err = np.linalg.norm(W - ref[t.name]) / np.linalg.norm(ref[t.name])
        assert err < {"MXFP4": 0.2, "Q8_0": 0.01, "F32": 1e-7}[t.tensor_type.name], (t.name, err)
        assert err > 0.01 or t.tensor_type.name != "MXFP4", (t.name, err)  # really 4-bit


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mxfp4_refused_on_dense_models(name, tmp_path):
    """MXFP4_MOE on a dense model would make nothing MXFP4 (llama.cpp gives every 2-D weight Q8_0): refused with
    what to export instead, nothing written."""
    base = build(name, tmp_path / "base")
    with pytest.raises(ExportError, match="MXFP4_MOE.*nothing MXFP4.*q8_0"):
        export(adapter(name, tmp_path / "a", base), tmp_path / "m.gguf", gguf_type="mxfp4")
    assert not (tmp_path / "m.gguf").exists()


def test_mxfp4_reads_back(tmp_path):
    """eval/generate read an mxfp4 Qwen3-MoE GGUF back (the MXFP4 expert stacks decoded by the gguf package): its
    logits on a 5-token prompt are the f32 GGUF's within the 4-bit experts' error (measured 2% of the largest)."""
    import torch

    from qlora_kit.export.gguf import reader

    base = build("qwen3moe", tmp_path / "base")
    a = adapter("qwen3moe", tmp_path / "a", base)
    export(a, tmp_path / "f32.gguf", gguf_type="f32")
    export(a, tmp_path / "mx.gguf", gguf_type="mxfp4")
    ids = torch.tensor([[1, 5, 17, 42, 99]])
    with torch.no_grad():
        ref = reader.load(tmp_path / "f32.gguf")[0](input_ids=ids).logits
        got = reader.load(tmp_path / "mx.gguf")[0](input_ids=ids).logits
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert 1e-4 < err < 0.06, err  # moved by the 4-bit blocks, and no further
