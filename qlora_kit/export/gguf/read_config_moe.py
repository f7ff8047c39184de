"""gpt-oss and DeepSeek-V2/V3 metadata back to config.json: the inverse of families_moe.gpt_oss_hparams and
families_moe.deepseek_hparams (read_config does the keys every family shares).

    gpt-oss     expert count / used count / width (the one intermediate_size its experts have), the sliding window,
                and what llama.cpp's gpt-oss graph fixes and the writer refuses otherwise: sliding on even layers,
                full on odd ones, attention biases, the clamped SwiGLU at alpha 1.702, limit 7 (transformers' defaults)
    DeepSeek    V2 or V3 by the router's gating function (sigmoid: V3; softmax or none written: V2, as llama.cpp reads
                a V2 file without the key); the latent attention's ranks and head widths from its key/value lengths
                (key_length = kv_lora + rope, value_length = kv_lora, the _mla lengths nope + rope and v), one kv "head"
                back to one per query head; leading dense layers, shared experts, routed scale, top-k
                renormalisation (V3 only), expert groups; YaRN's yarn_log_multiplier (0.1·mscale_all_dim) back to
                mscale == mscale_all_dim, the only YaRN the writer lets through
"""

from __future__ import annotations

from ...errors import ModelError

SIGMOID, SOFTMAX = 2, 1  # gguf.ExpertGatingFuncType (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_*)


def _refuse(what: str) -> ModelError:
    return ModelError(f"this GGUF's {what}; qlora-kit's GGUF reader would not read back the model the file holds. "
                      "Evaluate the model folder it came from, or run the GGUF in llama.cpp.")


def deepseek_class(meta, arch: str) -> str:
    """DeepseekV3ForCausalLM for a sigmoid router (V3's, with its correction bias), DeepseekV2ForCausalLM for
    softmax or none written (llama.cpp takes a missing key as V2's softmax)."""
    gating = meta.get(f"{arch}.expert_gating_func")
    if gating is None or int(gating) == SOFTMAX:
        return "DeepseekV2ForCausalLM"
    if int(gating) == SIGMOID:
        return "DeepseekV3ForCausalLM"
    raise _refuse(f"expert gating function is {gating} (neither softmax nor sigmoid, the routers of transformers' "
                  "DeepSeek-V2/V3)")


def gpt_oss(c: dict, get, stored) -> None:
    width = int(get("expert_feed_forward_length"))
    if width != c["intermediate_size"]:  # transformers' gpt-oss: one intermediate_size for every expert
        raise _refuse(f"experts are {width} wide and its feed-forward length {c['intermediate_size']}")
    c |= {"num_local_experts": int(get("expert_count")), "num_experts_per_tok": int(get("expert_used_count")),
          "sliding_window": int(get("attention.sliding_window")), "attention_bias": True,
          "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                          for i in range(c["num_hidden_layers"])],
          "swiglu_alpha": 1.702, "swiglu_limit": 7.0}


def deepseek(c: dict, get, stored) -> None:
    kv_heads = c.pop("num_key_value_heads")
    if kv_heads != 1:
        raise _refuse(f"latent attention has {kv_heads} kv heads (llama.cpp's deepseek2 files have one, the latent)")
    rope = int(get("rope.dimension_count"))
    kv_lora = int(get("attention.kv_lora_rank"))
    key, value = int(get("attention.key_length")), int(get("attention.value_length"))
    if (key, value) != (kv_lora + rope, kv_lora):
        raise _refuse(f"latent key/value lengths are {key}/{value}, not kv_lora_rank + rope dims / kv_lora_rank "
                      f"({kv_lora + rope}/{kv_lora})")
    q_lora = get("attention.q_lora_rank")
    c |= {"num_key_value_heads": c["num_attention_heads"],  # k and v per query head, from kv_b_proj
          "kv_lora_rank": kv_lora, "q_lora_rank": int(q_lora) if q_lora is not None else None,
          "qk_rope_head_dim": rope, "qk_nope_head_dim": int(get("attention.key_length_mla")) - rope,
          "v_head_dim": int(get("attention.value_length_mla")),
          "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
          "moe_intermediate_size": int(get("expert_feed_forward_length")),
          "n_routed_experts": int(get("expert_count")), "num_experts_per_tok": int(get("expert_used_count")),
          "n_shared_experts": int(get("expert_shared_count", 0)),
          "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
          "attention_bias": False}
    norm = bool(get("expert_weights_norm", False))
    groups, used = get("expert_group_count"), get("expert_group_used_count")
    if c["architectures"] == ["DeepseekV3ForCausalLM"]:  # V3's defaults (8 groups) are not what an absent key means
        c |= {"norm_topk_prob": norm, "n_group": int(groups or 1), "topk_group": int(used or 1),
              "rope_interleave": True}
    elif norm:
        raise _refuse("DeepSeek-V2 router renormalises its top-k weights (transformers' V2 router never does)")
    else:  # the writer refuses V2's group-limited routing over several groups: greedy top-k
        c |= {"norm_topk_prob": False, "topk_method": "greedy",
              "n_group": int(groups) if groups is not None else None,
              "topk_group": int(used) if used is not None else None}


def deepseek_yarn(meta, arch: str) -> dict:
    """mscale and mscale_all_dim (equal) from yarn_log_multiplier = 0.1·mscale_all_dim: transformers' DeepSeek then
    scales q·k by (1 + 0.1·mscale_all_dim·ln(factor))² and leaves the rotation unscaled, as llama.cpp's graph."""
    log_mul = meta.get(f"{arch}.rope.scaling.yarn_log_multiplier")
    if not log_mul:
        raise _refuse("DeepSeek YaRN has no yarn_log_multiplier (llama.cpp then leaves q·k unscaled, which no "
                      "transformers DeepSeek YaRN config does)")
    m = float(log_mul) / 0.1
    return {"mscale": m, "mscale_all_dim": m}
