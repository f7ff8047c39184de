"""The dense architectures llama.cpp runs, as its converter (convert_hf_to_gguf.py) writes them: for each Hugging Face
architecture, llama.cpp's name, the layout changes of its tensors and the hyperparameters its graph reads beyond the
common ones. The common part (block count, widths, heads, norm epsilon, RoPE) is in `arch`; names in `gguf`'s map.

Layout changes, each a function of the Hugging Face tensor alone, applied to a weight's output rows (and to an
adapter's lora_b, since P·(B@A) = (P·B)@A):

    permute_qk  llama, granite: q/k rows reordered within each head to the adjacent-pair RoPE of llama.cpp's graph
                (HF rotates pairs (i, i + d/2); llama.cpp's `llama` graph rotates (2i, 2i+1))
    qkv         fused query_key_value rows regrouped into [all q | all k | all v]: GPT-NeoX stores them per head
                (n_head, 3, d); Falcon per kv group (n_kv, n_head/n_kv + 2, d)
    conv1d      GPT-2's Conv1D weights are stored (in, out): transposed to llama.cpp's (out, in)
    norm_shift  Gemma's RMSNorm multiplies by (1 + w): every *norm.weight is written as w + 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import ExportError
from . import families_moe


@dataclass(frozen=True)
class Family:
    gguf: str  # the gguf package's MODEL_ARCH member (LLAMA, GEMMA2 ...)
    permute_qk: bool = False
    norm_shift: float = 0.0
    qkv: str | None = None  # "neox" | "falcon": how fused qkv rows are grouped in the HF checkpoint
    conv1d: tuple[str, ...] = ()  # module names whose 2-D weights are (in, out)
    layer_norm: bool = False  # LayerNorm (eps key layer_norm_eps) instead of RMSNorm
    tied: str = "config"  # "config": tie_word_embeddings decides; "always": lm_head never written (llama.cpp has none)
    extra: Callable[[Any, dict], None] | None = None  # more hparam keys: (writer, config)
    refuse: tuple[tuple[Callable[[dict], bool], str], ...] = field(default=())  # (test, what llama.cpp lacks)
    # (HF name, shape, config) -> [(HF-style name to look up, shape, take(W) or None)]: a tensor written as other
    # tensors ([] drops it), or None when written as it is (families_moe)
    split: Callable[[str, tuple[int, ...], dict], list | None] | None = None
    mla: bool = False  # DeepSeek's latent attention: one kv head, key/value lengths and RoPE dims of its own
    lora: tuple[str, ...] | None = None  # the GGUF weights (attn_output ...) llama.cpp's graph applies a LoRA
    # adapter to, when not all of them: it multiplies the others directly, so an adapter on them would be ignored


def _get(c: dict, *keys, default=None):
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    return default


def _gemma2(w, c):
    w.add_attn_logit_softcapping(float(c["attn_logit_softcapping"] or 0.0))
    w.add_final_logit_softcapping(float(c["final_logit_softcapping"] or 0.0))
    w.add_sliding_window(int(c["sliding_window"]))


def _gemma3(w, c):
    w.add_sliding_window(int(c["sliding_window"]))
    if c.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))


def _moe(w, c):
    w.add_expert_count(int(_get(c, "num_local_experts", "num_experts")))
    w.add_expert_used_count(int(c["num_experts_per_tok"]))
    if c.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    if c.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(int(c["shared_expert_intermediate_size"]))


def _phi3(w, c):
    if c.get("sliding_window"):  # llama.cpp reads it but runs Phi-3 with full attention (as its loader warns)
        w.add_sliding_window(int(c["sliding_window"]))


def _parallel(w, c):
    w.add_parallel_residual(bool(c.get("use_parallel_residual", True)))


def _cohere(w, c):
    w.add_logit_scale(float(c["logit_scale"]))


def _granite(w, c):
    w.add_embedding_scale(float(c.get("embedding_multiplier", 1.0)))
    w.add_residual_scale(float(c.get("residual_multiplier", 1.0)))
    w.add_attention_scale(float(c.get("attention_multiplier", 1.0)))
    w.add_logit_scale(float(c.get("logits_scaling", 1.0)))


def _scalar_not_head_dim(c: dict) -> bool:
    """llama.cpp's gemma2/3 graphs scale q by 1/sqrt(head_dim) (1/sqrt(hidden/heads) only for its 27B size class):
    HF's query_pre_attn_scalar must be head_dim."""
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c.get("query_pre_attn_scalar", head_dim) != head_dim


def _gemma3_local_rope(c: dict) -> bool:
    """llama.cpp's gemma3 graph hard-codes the sliding layers' RoPE: base 10000, no scaling."""
    rp = c.get("rope_parameters") or {}
    local = rp.get("sliding_attention") if isinstance(rp.get("sliding_attention"), dict) else {}
    theta = local.get("rope_theta", c.get("rope_local_base_freq", 10000.0))
    return float(theta) != 10000.0 or local.get("rope_type", "default") != "default"


_SWIGLU = (lambda c: c.get("hidden_act", c.get("hidden_activation", "silu")) not in ("silu", "swish"),
           "an MLP activation other than SiLU (llama.cpp's graph for this family is SwiGLU)")
_NO_BIAS = (lambda c: bool(c.get("attention_bias") or c.get("mlp_bias")),
            "attention/MLP biases (llama.cpp's graph for this family has none)")

_SPARSE_EVERY_LAYER = ((lambda c: c.get("decoder_sparse_step", 1) != 1 or bool(c.get("mlp_only_layers")),
                        "dense MLP layers between MoE layers (decoder_sparse_step, mlp_only_layers)"),)

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LLAMA", permute_qk=True, refuse=(_SWIGLU, _NO_BIAS)),
    "MistralForCausalLM": Family("LLAMA", permute_qk=True, refuse=(_SWIGLU,)),
    "Qwen2ForCausalLM": Family("QWEN2", refuse=(_SWIGLU,)),
    "Qwen3ForCausalLM": Family("QWEN3", refuse=(_SWIGLU, _NO_BIAS)),
    "MixtralForCausalLM": Family("LLAMA", permute_qk=True, extra=_moe, refuse=(_SWIGLU,)),
    "Qwen2MoeForCausalLM": Family("QWEN2MOE", extra=_moe, refuse=_SPARSE_EVERY_LAYER + (
        (lambda c: bool(c.get("norm_topk_prob")), "renormalised top-k router weights (llama.cpp's qwen2moe: none)"),)),
    "Qwen3MoeForCausalLM": Family("QWEN3MOE", extra=_moe, refuse=_SPARSE_EVERY_LAYER + (
        (lambda c: not c.get("norm_topk_prob", True), "unnormalised top-k router weights (llama.cpp's qwen3moe "
                                                      "renormalises)"),)),
    "GemmaForCausalLM": Family("GEMMA", norm_shift=1.0, tied="always"),
    "Gemma2ForCausalLM": Family("GEMMA2", norm_shift=1.0, tied="always", extra=_gemma2, refuse=(
        (_scalar_not_head_dim, "a query_pre_attn_scalar other than head_dim (llama.cpp's gemma2 scale)"),)),
    "Gemma3ForCausalLM": Family("GEMMA3", norm_shift=1.0, extra=_gemma3, refuse=(
        (_scalar_not_head_dim, "a query_pre_attn_scalar other than head_dim (llama.cpp's gemma3 scale)"),
        (_gemma3_local_rope, "sliding-layer RoPE other than base 10000 unscaled (llama.cpp hard-codes it)"),
        (lambda c: c.get("attn_logit_softcapping") is not None, "attention logit softcapping"),
        (lambda c: int(c.get("_sliding_window_pattern") or c.get("sliding_window_pattern") or 6) != 6,
         "a sliding-window pattern other than 5 local : 1 global (llama.cpp hard-codes 6)"))),
    "Phi3ForCausalLM": Family("PHI3", extra=_phi3),
    "PhiForCausalLM": Family("PHI2", layer_norm=True, refuse=(
        (lambda c: bool(c.get("qk_layernorm")), "q/k LayerNorms (qk_layernorm; llama.cpp's phi2 graph has none)"),)),
    "FalconForCausalLM": Family("FALCON", layer_norm=True, qkv="falcon", refuse=(
        (lambda c: bool(c.get("alibi")), "ALiBi position biases (llama.cpp's falcon graph uses RoPE)"),
        (lambda c: bool(c.get("bias")), "linear biases (llama.cpp's falcon graph has none)"),
        (lambda c: not c.get("parallel_attn", True), "sequential attention/MLP (parallel_attn false: Falcon-RW)"),
        (lambda c: (c.get("num_ln_in_parallel_attn") or 2) != 2 and c.get("new_decoder_architecture"),
         "a single LayerNorm in the new decoder architecture"))),
    "StableLmForCausalLM": Family("STABLELM", layer_norm=True, extra=_parallel, refuse=(
        (lambda c: bool(c.get("qk_layernorm")), "per-head q/k LayerNorms (qk_layernorm: not written here)"),)),
    "Starcoder2ForCausalLM": Family("STARCODER2", layer_norm=True, refuse=(
        (lambda c: not c.get("use_bias", True), "linear layers without biases (llama.cpp's starcoder2 needs them)"),)),
    "Olmo2ForCausalLM": Family("OLMO2", refuse=(_SWIGLU, _NO_BIAS)),
    "CohereForCausalLM": Family("COMMAND_R", layer_norm=True, tied="always", extra=_cohere, refuse=(
        (lambda c: bool(c.get("use_qk_norm")), "q/k norms (use_qk_norm: not written here)"), _NO_BIAS)),
    "GraniteForCausalLM": Family("GRANITE", permute_qk=True, extra=_granite, refuse=(_SWIGLU, _NO_BIAS)),
    "GPTNeoXForCausalLM": Family("GPTNEOX", layer_norm=True, qkv="neox", extra=_parallel, refuse=(
        (lambda c: not c.get("attention_bias", True), "attention without biases (llama.cpp's gptneox needs them)"),)),
    "GPT2LMHeadModel": Family("GPT2", layer_norm=True, conv1d=("c_attn", "c_proj", "c_fc"), refuse=(
        (lambda c: bool(c.get("scale_attn_by_inverse_layer_idx")), "attention scaled by 1/layer index"),
        (lambda c: not c.get("scale_attn_weights", True), "unscaled attention (scale_attn_weights false)"),
        (lambda c: bool(c.get("reorder_and_upcast_attn")), "reordered attention upcasting"))),
    "GptOssForCausalLM": Family("GPT_OSS", extra=families_moe.gpt_oss_hparams, split=families_moe.gpt_oss_split,
                                refuse=families_moe.GPT_OSS_REFUSE),
    "DeepseekV2ForCausalLM": Family("DEEPSEEK2", extra=families_moe.deepseek_hparams, mla=True,
                                    lora=families_moe.DEEPSEEK_LORA,
                                    split=families_moe.deepseek_split, refuse=families_moe.DEEPSEEK_REFUSE),
    "DeepseekV3ForCausalLM": Family("DEEPSEEK2", extra=families_moe.deepseek_hparams, mla=True,
                                    lora=families_moe.DEEPSEEK_LORA,
                                    split=families_moe.deepseek_split, refuse=families_moe.DEEPSEEK_REFUSE),
}

NOT_RUN: dict[str, str] = {}  # architectures llama.cpp runs that this exporter does not write yet: why


def family_of(config: dict) -> tuple[str, Family]:
    """(architecture, Family) of a config.json, or an ExportError naming what llama.cpp (or this exporter) lacks."""
    hf = (config.get("architectures") or ["?"])[0]
    fam = FAMILIES.get(hf)
    if fam is None:
        why = NOT_RUN.get(hf, "llama.cpp's converter has no mapping for it here")
        raise ExportError(f"GGUF export: {hf} cannot be written ({why}). Supported: {', '.join(sorted(FAMILIES))}. "
                          "Use --format merged and llama.cpp's convert_hf_to_gguf.py if it supports the model.")
    missing = [what for test, what in fam.refuse if test(config)]
    if missing:
        raise ExportError(f"GGUF export: this {hf} uses {'; '.join(missing)}, which llama.cpp's "
                          f"{fam.gguf.lower()} graph does not run. Use --format merged.")
    return hf, fam


def n_layers(c: dict) -> int:
    return int(_get(c, "num_hidden_layers", "n_layer"))


def hidden(c: dict) -> int:
    return int(_get(c, "hidden_size", "n_embd"))


def n_heads(c: dict) -> int:
    return int(_get(c, "num_attention_heads", "n_head"))


def n_heads_kv(c: dict, fam: Family) -> int:
    if fam.mla:  # llama.cpp's converter: MLA as multi-query attention over the latent
        return 1
    if fam.gguf == "FALCON" and not c.get("new_decoder_architecture"):
        return 1 if c.get("multi_query", True) else n_heads(c)
    return int(_get(c, "num_key_value_heads", "num_kv_heads", default=n_heads(c)))


def ffn(c: dict) -> int:
    return int(_get(c, "ffn_hidden_size", "intermediate_size", "n_inner", default=4 * hidden(c)))  # Falcon: the first


def norm_eps(c: dict) -> float:
    return float(_get(c, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", default=1e-5))


def context(c: dict) -> int:
    return int(_get(c, "max_position_embeddings", "n_positions", default=2048))
