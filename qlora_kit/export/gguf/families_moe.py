"""gpt-oss and DeepSeek-V2/V3 as llama.cpp's converter writes them (its GptOssModel and DeepseekV2Model): the
hyperparameter keys beyond the common ones, the refusals for what llama.cpp's graphs hard-code, and the tensors
whose Hugging Face layout is not llama.cpp's (`split`).

gpt-oss (llama.cpp's `gpt-oss` graph)
    experts     fused (E, hidden, 2·I) `gate_up_proj` with gate and up in alternating columns (x @ W), and
                (E, I, hidden) `down_proj`: written as ffn_gate_exps / ffn_up_exps (E, I, hidden) and ffn_down_exps
                (E, hidden, I), each expert's (out, in) matrix; their biases split the same way
    sinks       one learned logit per head (attention's extra softmax column): blk.N.attn_sinks.weight
    graph       sliding window on even layers, full attention on odd ones (llama.cpp's pattern 2); the clamped
                SwiGLU x·σ(1.702·x)·(y + 1) with limit 7 and top-k-then-softmax routing, all hard-coded there

DeepSeek-V2/V3 (llama.cpp's `deepseek2` graph, multi-head latent attention)
    kv_b_proj   (n_head · (nope + v), kv_lora) rows per head [k_nope | v]: written as attn_k_b
                (n_head, kv_lora, nope), each head's k part transposed for the absorbed attention, and attn_v_b
                (n_head, v, kv_lora)
    router      V2: softmax, top-k, × routed_scaling_factor; V3: sigmoid + e_score_correction_bias
                (exp_probs_b) for the choice, group-limited (top-2 sum per group), renormalised, × the factor
    layers      the first first_k_dense_replace layers dense; MTP layers past num_hidden_layers are not written
    LoRA        an adapter GGUF reaches only what the graph multiplies through its LoRA path (DEEPSEEK_LORA): the
                output projection, the MLPs and the experts; the merged GGUF takes a LoRA on any module
    RoPE        the rotary part of q and k as adjacent pairs (DeepSeek's layout, llama.cpp's `norm` RoPE): no
                permutation; HF's rope_interleave false (rotate_half on de-interleaved pairs) is refused. YaRN:
                llama.cpp's graph undoes the rotation's own 0.1·ln(factor) + 1 and scales q·k by
                (1 + yarn_log_multiplier·ln(factor))², the converter's multiplier 0.1·mscale_all_dim; transformers
                matches when mscale == mscale_all_dim (rotation factor 1, the same q·k scale)
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Piece = tuple[str, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor] | None]  # (HF-style name, shape, take)


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


# --- gpt-oss -----------------------------------------------------------------------------------------------------

def gpt_oss_hparams(w: Any, c: dict) -> None:
    w.add_expert_count(int(c["num_local_experts"]))
    w.add_expert_used_count(int(c["num_experts_per_tok"]))
    w.add_expert_feed_forward_length(int(c["intermediate_size"]))
    w.add_sliding_window(int(c["sliding_window"]))


def _gpt_oss_pattern(c: dict) -> bool:
    """True when the layer types are not llama.cpp's: sliding on even layers, full on odd ones."""
    types = c.get("layer_types")
    want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(int(c["num_hidden_layers"]))]
    return types is not None and list(types) != want


GPT_OSS_REFUSE = (
    (lambda c: abs(float(c.get("swiglu_alpha", 1.702)) - 1.702) > 1e-6 or float(c.get("swiglu_limit", 7.0)) != 7.0,
     "a clamped SwiGLU other than alpha 1.702, limit 7 (llama.cpp hard-codes both)"),
    (_gpt_oss_pattern, "layer types other than sliding/full alternating from a sliding first layer (llama.cpp's "
                       "sliding-window pattern 2)"),
    (lambda c: not c.get("attention_bias", True), "attention without biases (llama.cpp's gpt-oss graph needs them)"),
)


def _cols(start: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(E, hidden, 2I) with gate/up in alternating columns -> (E, I, hidden): every other column, transposed."""
    return lambda W: W[..., start::2].transpose(-1, -2).contiguous()


def gpt_oss_split(name: str, shape: tuple[int, ...], c: dict) -> list[Piece] | None:
    if name.endswith(".self_attn.sinks"):
        return [(name + ".weight", shape, None)]
    if name.endswith(".mlp.experts.gate_up_proj"):
        e, h, i2 = shape
        stem = name[: -len("gate_up_proj")]
        return [(f"{stem}{kind}_proj.weight", (e, i2 // 2, h), _cols(k)) for k, kind in enumerate(("gate", "up"))]
    if name.endswith(".mlp.experts.gate_up_proj_bias"):
        e, i2 = shape
        stem = name[: -len("gate_up_proj_bias")]
        return [(f"{stem}{kind}_proj.bias", (e, i2 // 2), lambda W, k=k: W[..., k::2].contiguous())
                for k, kind in enumerate(("gate", "up"))]
    if name.endswith(".mlp.experts.down_proj"):
        e, i, h = shape
        return [(name + ".weight", (e, h, i), lambda W: W.transpose(-1, -2).contiguous())]
    if name.endswith(".mlp.experts.down_proj_bias"):
        return [(name[: -len("_bias")] + ".bias", shape, None)]
    return None


# --- DeepSeek-V2/V3 ----------------------------------------------------------------------------------------------

# the weights llama.cpp's deepseek2 graph multiplies through its LoRA path (build_lora_mm / build_lora_mm_id):
# attention's output (build_attn), the dense first layers' and the shared experts' MLP (build_ffn), the router and
# the routed experts (build_moe_ffn). q_a/q_b/q, kv_a_mqa, k_b, v_b and the output head are plain ggml_mul_mat: a
# LoRA on them would be ignored
DEEPSEEK_LORA = ("attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                 "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
LITE_LAYERS = (26, 27)  # llama.cpp: no q LoRA rank ("lite", DeepSeek-V2-Lite, GigaChat3) exactly at these


def _v3(c: dict) -> bool:
    return (c.get("architectures") or [""])[0] == "DeepseekV3ForCausalLM"


def _rope(c: dict) -> dict:
    return c.get("rope_parameters") or c.get("rope_scaling") or {}


def _rope_kind(c: dict) -> str:
    return _rope(c).get("rope_type", _rope(c).get("type", "default"))


def limits_groups(c: dict) -> bool:
    """Whether transformers' router keeps only topk_group of n_group expert groups: V3 with 1 <= topk_group < n_group.
    llama.cpp's build_moe_ffn limits groups (top-2 sum per group) whenever expert_group_count > 1 is written, so the
    count is written only then: V2's greedy router ignores n_group, and keeping every group is no limit (llama.cpp
    also asserts n_group_used < n_expert_groups)."""
    n = int(c.get("n_group") or 1)
    return _v3(c) and n > 1 and int(c.get("topk_group") or n) < n


def deepseek_hparams(w: Any, c: dict) -> None:
    import gguf

    kv_lora, rope, nope = int(c["kv_lora_rank"]), int(c["qk_rope_head_dim"]), int(c["qk_nope_head_dim"])
    w.add_leading_dense_block_count(int(c.get("first_k_dense_replace") or 0))
    if c.get("q_lora_rank") is not None:
        w.add_q_lora_rank(int(c["q_lora_rank"]))
    # MLA runs as multi-query attention over the latent: one kv "head" of kv_lora + rope (k) and kv_lora (v)
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(int(c["v_head_dim"]))
    w.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    w.add_expert_count(int(c["n_routed_experts"]))
    w.add_expert_used_count(int(c["num_experts_per_tok"]))
    w.add_expert_shared_count(int(c.get("n_shared_experts") or 0))
    w.add_expert_weights_scale(float(c.get("routed_scaling_factor", 1.0)))
    if c.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    if limits_groups(c):
        w.add_expert_group_count(int(c["n_group"]))
        w.add_expert_group_used_count(int(c["topk_group"]))
    if _rope_kind(c) == "yarn":  # llama.cpp's attention scale (1 + log_mul·ln(factor))² / sqrt(d), as the converter
        w.add_rope_scaling_yarn_log_mul(0.1 * float(_rope(c)["mscale_all_dim"]))
    # transformers' routers: V3 sigmoid (the Hub config's scoring_func), V2 softmax
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if _v3(c) else gguf.ExpertGatingFuncType.SOFTMAX)


MLA_KEYS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_routed_experts",
            "moe_intermediate_size")
DEEPSEEK_REFUSE = (
    (lambda c: any(c.get(k) is None for k in MLA_KEYS),
     f"a config.json lacking the latent attention and expert sizes ({', '.join(MLA_KEYS)})"),
    (lambda c: _v3(c) and c.get("scoring_func", "sigmoid") != "sigmoid",
     "a router scoring function other than sigmoid"),
    (lambda c: not _v3(c) and c.get("topk_method", "greedy") != "greedy" and int(c.get("n_group") or 1) > 1,
     "V2's group_limited_greedy routing (the best expert of each group; llama.cpp ranks groups by their top-2 sum)"),
    (lambda c: not _v3(c) and bool(c.get("norm_topk_prob")),
     "norm_topk_prob on V2 (transformers' V2 router never renormalises; llama.cpp would)"),
    (lambda c: (c.get("q_lora_rank") is None) != (int(c["num_hidden_layers"]) in LITE_LAYERS),
     "a q projection without LoRA rank on a model whose layer count is not DeepSeek-V2-Lite's 26/27, or one with a "
     "rank on 26/27 layers (llama.cpp's deepseek2 graph tells the two apart by the layer count alone)"),
    (lambda c: int(c.get("moe_layer_freq") or 1) != 1, "MoE only every moe_layer_freq layers"),
    (lambda c: _v3(c) and not c.get("rope_interleave", True),
     "rope_interleave false (rotate_half on the rotary dims; llama.cpp rotates DeepSeek's adjacent pairs)"),
    (lambda c: bool(c.get("attention_bias")) or bool(c.get("mlp_bias")), "attention/MLP biases"),
    (lambda c: _rope_kind(c) not in ("default", "yarn"), "RoPE scaling other than YaRN"),
    (lambda c: _rope_kind(c) == "yarn" and (not _rope(c).get("mscale_all_dim") or _rope(c).get("attention_factor")
                                            is not None or _rope(c).get("mscale") != _rope(c).get("mscale_all_dim")),
     "YaRN without mscale == mscale_all_dim (llama.cpp keeps the rotation unscaled and puts mscale_all_dim's factor "
     "squared into the attention scale: transformers does the same only when the two are equal)"),
    (lambda c: c.get("hidden_act", "silu") not in ("silu", "swish"), "an MLP activation other than SiLU"),
)


def deepseek_split(name: str, shape: tuple[int, ...], c: dict) -> list[Piece] | None:
    layer = _layer(name)
    if layer is not None and layer >= int(c["num_hidden_layers"]):
        return []  # multi-token-prediction layers: llama.cpp's converter skips them too
    if name.endswith(".mlp.gate.e_score_correction_bias"):
        return [(name.replace("e_score_correction_bias", "e_score_correction.bias"), shape, None)]
    if not name.endswith(".self_attn.kv_b_proj.weight"):
        return None
    heads, nope, v = int(c["num_attention_heads"]), int(c["qk_nope_head_dim"]), int(c["v_head_dim"])
    rank = shape[1]
    stem = name[: -len("kv_b_proj.weight")]
    return [(stem + "k_b_proj.weight", (heads, rank, nope), lambda W: _per_head(W, heads, nope, v)[0]),
            (stem + "v_b_proj.weight", (heads, v, rank), lambda W: _per_head(W, heads, nope, v)[1])]


def _per_head(W: torch.Tensor, heads: int, nope: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b (heads · (nope + v), rank) -> k_b (heads, rank, nope), v_b (heads, v, rank)."""
    kv = W.reshape(heads, nope + v, W.shape[-1])
    return kv[:, :nope].transpose(1, 2).contiguous(), kv[:, nope:].contiguous()
