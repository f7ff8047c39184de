"""Mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, gpt-oss.

Experts are counted as transformers 5 holds them: one fused (E, 2I, H) gate_up_proj and one (E, H, I) down_proj
parameter per layer (gpt-oss: transposed, with biases), each expert quantized like a Linear and given its own LoRA
pair. Every expert is resident (weights: all E); a token runs through top_k of them (activations: top_k x I). The
router (`mlp.gate` / `mlp.router`) stays unquantized and frozen: it counts in `other`."""

from __future__ import annotations

from .families import attention, build, gated_mlp, heads
from .shapes import Layout, LinearShape, ModelShapes, Moe

_CORE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def experts(H: int, I: int, E: int, layers: int, bias: bool = False, name: str = "experts"
            ) -> tuple[LinearShape, ...]:
    return (LinearShape("gate_up_proj", H, 2 * I, bias, layers, E, f"mlp.{name}.gate_up_proj"),
            LinearShape("down_proj", I, H, bias, layers, E, f"mlp.{name}.down_proj"))


def _sparse_layers(c: dict, E: int) -> int:
    """Qwen2/3-MoE: layer i is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step, only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or ())
    return sum(1 for i in range(c["num_hidden_layers"]) if i not in only and E > 0 and (i + 1) % step == 0)


def mixtral(c: dict) -> ModelShapes:
    H, L, I = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    E, k = c.get("num_local_experts", 8), c.get("num_experts_per_tok", 2)
    linears = attention(c, L, False, False) + experts(H, I, E, L)
    norms = {"layer_norms": L * 2 * H, "norm": H, "router": L * E * H}
    return build(c, linears, norms, moe=Moe(E, k, I, 0, L), layout=Layout(norm="lean"))  # lean_norm.py RMSNorms


def qwen_moe(c: dict) -> ModelShapes:
    """Qwen2-MoE (q/k/v biases, a shared expert behind a sigmoid gate) and Qwen3-MoE (q_norm, k_norm)."""
    qwen3 = c.get("model_type") == "qwen3_moe"
    H, L, I = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    # the Hub's config.json says num_experts; transformers 5 saves it as num_local_experts
    E = c.get("num_experts", c.get("num_local_experts", 128 if qwen3 else 60))
    k = c.get("num_experts_per_tok", 8 if qwen3 else 4)
    moe_i = c.get("moe_intermediate_size", 768 if qwen3 else 1408)
    shared = 0 if qwen3 else c.get("shared_expert_intermediate_size", 5632)
    sparse = _sparse_layers(c, E)
    ab = bool(c.get("attention_bias", False))
    linears = attention(c, L, c.get("qkv_bias", True) if not qwen3 else ab, ab if qwen3 else False)
    linears += experts(H, moe_i, E, sparse)
    if shared:  # the shared expert, and its sigmoid gate: a Linear (H -> 1), quantized and adapted as any Linear
        linears += gated_mlp(H, shared, False, sparse, prefix="mlp.shared_expert")
        linears += (LinearShape("shared_expert_gate", H, 1, False, sparse, path="mlp.shared_expert_gate",
                                group="mlp.shared_expert.gate_up"),)  # reads the shared expert's input
    if L - sparse:
        linears += gated_mlp(H, I, False, L - sparse)
    nh, kv, hd = heads(c)
    norms = {"layer_norms": L * 2 * H, "norm": H, "router": sparse * E * H,
             "qk_norms": L * 2 * hd if qwen3 else 0}
    # their RMSNorms (q/k norms too) are lean_norm.py's: Llama's forward
    layout = Layout(norm="lean", qk_norm=(nh + kv) * hd) if qwen3 else Layout(norm="lean")
    # the router casts its top-k weights back to the logits' dtype (c); the shared expert runs before the routed
    moe = Moe(E, k, moe_i, shared, sparse, shared_gate=bool(shared), weights_fp32=False)
    return build(c, linears, norms, layout=layout, moe=moe)


def deepseek(c: dict) -> ModelShapes:
    """DeepSeek-V2/V3: multi-head latent attention (q_a/q_b or q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, with
    RMSNorms on the two latents), dense MLPs in the first first_k_dense_replace layers, then routed + shared experts."""
    v3 = c.get("model_type") == "deepseek_v3"
    H, L, I, nh = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["num_attention_heads"]
    q_rank = c.get("q_lora_rank", 1536)
    kv_rank = c.get("kv_lora_rank", 512)
    rope, nope, vd = c.get("qk_rope_head_dim", 64), c.get("qk_nope_head_dim", 128), c.get("v_head_dim", 128)
    qk = rope + nope
    ab = bool(c.get("attention_bias", False))
    att = "self_attn"
    if q_rank:
        linears = (LinearShape("q_a_proj", H, q_rank, ab, L, path=f"{att}.q_a_proj", group="latent_in"),
                   LinearShape("q_b_proj", q_rank, nh * qk, False, L, path=f"{att}.q_b_proj"))
    else:
        linears = (LinearShape("q_proj", H, nh * qk, False, L, path=f"{att}.q_proj", group="latent_in"),)
    linears += (LinearShape("kv_a_proj_with_mqa", H, kv_rank + rope, ab, L, path=f"{att}.kv_a_proj_with_mqa",
                            group="latent_in"),
                LinearShape("kv_b_proj", kv_rank, nh * (nope + vd), False, L, path=f"{att}.kv_b_proj"),
                LinearShape("o_proj", nh * vd, H, ab, L, path=f"{att}.o_proj"))
    E = c.get("n_routed_experts", 256 if v3 else 64)
    k = c.get("num_experts_per_tok") or (8 if v3 else 6)
    moe_i = c.get("moe_intermediate_size", 2048 if v3 else 1407)
    shared = (c.get("n_shared_experts") or 0) * moe_i
    dense = min(c.get("first_k_dense_replace", 3 if v3 else 0), L)
    sparse = L - dense
    linears += experts(H, moe_i, E, sparse)
    if shared and sparse:
        linears += gated_mlp(H, shared, False, sparse, prefix="mlp.shared_experts")
    if dense:
        linears += gated_mlp(H, I, False, dense)
    norms = {"layer_norms": L * 2 * H, "norm": H, "latent_norms": L * ((q_rank or 0) + kv_rank),
             "router": sparse * E * H}
    # lean_norm.py's RMSNorms (the latent norms too). v is a view of kv_b_proj's (B, S, nh, nope + vd) output: what
    # SDPA saves for it keeps that whole tensor; q and k are rebuilt by a cat (their rope part), so SDPA's output is
    # (B, nh, S, vd) and o_proj reads a copy of it
    layout = Layout(norm="lean", q=nh * qk, k=nh * qk, v=nh * (nope + vd), o_view=False,
                    latent_norms=(q_rank, kv_rank) if q_rank else (kv_rank,), latent_beside=rope)
    # an fp32 router (its weights fp32 too); the shared expert runs on the layer's input after the routed experts
    moe = Moe(E, k, moe_i, shared, sparse, shared_last=True) if sparse else None
    return build(c, linears, norms, layout=layout, moe=moe,
                 intermediate=I if dense else moe_i)


def gpt_oss(c: dict) -> ModelShapes:
    """gpt-oss: biased q/k/v/o, a learned attention sink per head, a biased router, fused experts with biases
    (stored (E, in, out)); sliding-window attention on every other layer."""
    H, L, I, nh = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["num_attention_heads"]
    E, k = c.get("num_local_experts", 128), c.get("num_experts_per_tok", 4)
    ab = bool(c.get("attention_bias", True))
    linears = attention(c, L, ab, ab) + experts(H, I, E, L, bias=True)
    norms = {"layer_norms": L * 2 * H, "norm": H, "router": L * (E * H + E), "sinks": L * nh}
    # transformers' eager attention (SDPA has no sinks): explicit (B, nh, S, S + 1) scores, a (B, 1, S, S) mask per
    # attention kind (sliding-window and full), and o_proj's input a contiguous copy of the (B, nh, S, hd) output
    masks = 2 if c.get("sliding_window") else 1
    # the router's softmax runs in the logits' dtype: c routing weights
    return build(c, linears, norms, moe=Moe(E, k, I, 0, L, weights_fp32=False),
                 layout=Layout(norm="rms32", eager=True, sinks=True, masks=masks, o_view=False, glu_saved=6))


MOE = {"mixtral": (mixtral, _CORE), "qwen2_moe": (qwen_moe, _CORE), "qwen3_moe": (qwen_moe, _CORE),
       "deepseek_v2": (deepseek, _CORE), "deepseek_v3": (deepseek, _CORE), "gpt_oss": (gpt_oss, _CORE)}
