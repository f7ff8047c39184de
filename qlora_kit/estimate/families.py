"""Dense decoder families: their Linears and unquantized parameters, by the module names of transformers' own model
classes (checked against them, family by family, in tests/test_estimate_families.py). Defaults for absent keys are
those of transformers' config class of the family."""

from __future__ import annotations

from dataclasses import replace

from .shapes import Layout, LinearShape, ModelShapes

LEAN_NORMS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite")  # lean_norm.LEAN's RMSNorm classes
_CORE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def act_saved(name: str) -> int:
    """(T, I) tensors a plain MLP's activation saves: torch's gelu/relu its input; gelu_new and its kin compute
    0.5 x (1 + tanh(...)) in Python ops, which save 4."""
    return 4 if name in ("gelu_new", "gelu_fast", "gelu_python_tanh", "gelu_accurate") else 1


def heads(c: dict) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim); head_dim absent -> hidden // heads."""
    nh = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or nh
    return nh, kv, c.get("head_dim") or c["hidden_size"] // nh


def attention(c: dict, L: int, qkv_bias: bool, o_bias: bool, o_name: str = "o_proj", fused: str | None = None,
              prefix: str = "self_attn") -> tuple[LinearShape, ...]:
    """q/k/v (or one fused qkv Linear) and the output projection of L layers."""
    H = c["hidden_size"]
    nh, kv, hd = heads(c)
    if fused:
        qkv = (LinearShape(fused, H, (nh + 2 * kv) * hd, qkv_bias, L, path=f"{prefix}.{fused}"),)
    else:
        qkv = tuple(LinearShape(n, H, w * hd, qkv_bias, L, path=f"{prefix}.{n}", group="qkv")
                    for n, w in (("q_proj", nh), ("k_proj", kv), ("v_proj", kv)))
    return qkv + (LinearShape(o_name, nh * hd, H, o_bias, L, path=f"{prefix}.{o_name}"),)


def fused_v(c: dict) -> dict:
    """A fused q/k/v projection's v, as SDPA saves it: a view into the projection's whole (T, (nh + 2 kv) * hd)
    output (Phi-3's chunk, Falcon's split/unbind, GPT-NeoX's chunk), which keeps all of it alive; q and k are new
    tensors after rotary (a cat), so nothing else holds that storage. Layout.v counts that width."""
    nh, kv, hd = heads(c)
    return {"v": (nh + 2 * kv) * hd}


def gated_mlp(H: int, I: int, bias: bool, L: int, prefix: str = "mlp", fused: bool = False) -> tuple[LinearShape, ...]:
    if fused:  # Phi-3: one gate_up_proj, chunked in two
        up = (LinearShape("gate_up_proj", H, 2 * I, bias, L, path=f"{prefix}.gate_up_proj"),)
    else:
        up = tuple(LinearShape(n, H, I, bias, L, path=f"{prefix}.{n}", group=f"{prefix}.gate_up")
                   for n in ("gate_proj", "up_proj"))
    return up + (LinearShape("down_proj", I, H, bias, L, path=f"{prefix}.down_proj"),)


def plain_mlp(H: int, I: int, bias: bool, L: int, names: tuple[str, str], prefix: str = "mlp"
              ) -> tuple[LinearShape, ...]:
    return (LinearShape(names[0], H, I, bias, L, path=f"{prefix}.{names[0]}"),
            LinearShape(names[1], I, H, bias, L, path=f"{prefix}.{names[1]}"))


def build(c: dict, linears: tuple[LinearShape, ...], norms: dict[str, int], *, embed: str = "embed_tokens",
          tied_default: bool = False, head_bias: int = 0, layout: Layout | None = None, moe=None,
          intermediate: int | None = None) -> ModelShapes:
    """ModelShapes from the Linears and the other parameters; biases of the Linears are counted unquantized."""
    H, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    nh, kv, hd = heads(c)
    tied = bool(c.get("tie_word_embeddings", tied_default))
    other = {embed: V * H, **{k: v for k, v in norms.items() if v},
             "linear_biases": sum(lin.count * lin.out_features for lin in linears if lin.bias)}
    if not tied:
        other["lm_head"] = V * H + head_bias
    lay = layout or Layout()
    lay = Layout(**{**lay.__dict__, "q": lay.q or nh * hd, "k": lay.k or kv * hd, "v": lay.v or kv * hd,
                    "sliding_window": c.get("sliding_window") if c.get("use_sliding_window", True) else None,
                    "final_logit_softcapping": c.get("final_logit_softcapping"),
                    "logit_scale": c.get("logit_scale") is not None or c.get("logits_scaling") is not None})
    return ModelShapes(c.get("model_type", "llama"), H, intermediate or c.get("intermediate_size", 0), L, nh, kv,
                       hd, V, c.get("max_position_embeddings", 2048), tied, linears, other, moe, lay)


def llama_like(c: dict) -> ModelShapes:
    """Llama, Mistral, Qwen2, Qwen3, Granite, Gemma, Gemma 2, Gemma 3, OLMo 2, Cohere, StableLM: q/k/v/o + a gated
    MLP; they differ in biases, norms and their defaults."""
    t = c.get("model_type", "llama")
    H, L = c["hidden_size"], c["num_hidden_layers"]
    nh, kv, hd = heads(c)
    ab = bool(c.get("attention_bias", False))
    qkv_bias, o_bias = {"qwen2": (True, False), "stablelm": (bool(c.get("use_qkv_bias", False)), False)}.get(
        t, (ab, ab))
    mlp_bias = bool(c.get("mlp_bias", False)) if t in ("llama", "granite") else False
    linears = attention(c, L, qkv_bias, o_bias) + gated_mlp(H, c["intermediate_size"], mlp_bias, L)
    norms = {"layer_norms": L * 2 * H, "norm": H}
    # lean_norm.py makes the Llama/Mistral/Qwen/Granite RMSNorms lean; the others keep transformers' fp32 forward
    lay = Layout(norm="lean" if t in LEAN_NORMS else "rms32", weight_copy=t.startswith("gemma"))
    if t in ("gemma2", "gemma3_text"):  # input, post_attention, pre_feedforward, post_feedforward
        norms["layer_norms"], lay = L * 4 * H, replace(lay, norms_per_layer=4)
    if t == "gemma2":  # its attention-logit softcapping runs in transformers' eager attention
        lay = replace(lay, eager=True, o_view=False, masks=2)
    if t in ("gemma2", "gemma3_text", "olmo2"):  # post_feedforward_layernorm: after the MLP
        lay = replace(lay, post_norm=True)
    if t == "granite":  # h = residual + branch * residual_multiplier; embeddings * embedding_multiplier
        lay = replace(lay, residual_scale=True, scaled_embedding=True)
    if t in ("qwen3", "gemma3_text"):  # q_norm, k_norm over the head dimension
        norms["qk_norms"] = L * 2 * hd
        lay = replace(lay, qk_norm=(nh + kv) * hd, qk_norm_fp32=t != "qwen3")
    if t == "olmo2":  # norms after attention and MLP (no input norm); q_norm, k_norm over all heads
        norms["qk_norms"] = L * (nh + kv) * hd
        lay = replace(lay, input_norm=False, qk_norm=(nh + kv) * hd, qk_norm_vectors=2, qk_norm_fp32=True)
    if t == "cohere":  # one LayerNorm (weight only, computed in fp32) feeding attention and MLP in parallel
        norms = {"layer_norms": L * H, "norm": H}
        lay = Layout(norm="cohere", norms_per_layer=1, weight_copy=True, parallel=True)
        if c.get("use_qk_norm"):
            norms["qk_norms"] = L * (nh + kv) * hd
            lay = replace(lay, qk_norm=(nh + kv) * hd, qk_norm_fp32=True)
    if t == "stablelm":  # LayerNorms with biases
        norms, lay = {"layer_norms": L * 4 * H, "norm": 2 * H}, Layout(norm="layer", o_view=False)
        if c.get("use_parallel_residual"):
            norms["layer_norms"] = L * 2 * H
            lay = Layout(norm="layer", norms_per_layer=1, parallel=True, o_view=False)
        if c.get("qk_layernorm"):  # one LayerNorm (weight, no bias) per head, over head_dim
            norms["qk_norms"] = L * (nh + kv) * hd
            lay = replace(lay, qk_norm=(nh + kv) * hd, qk_norm_fp32=True)
    return build(c, linears, norms, tied_default=t in ("gemma", "gemma2", "gemma3_text", "cohere"), layout=lay)


def phi3(c: dict) -> ModelShapes:
    H, L = c["hidden_size"], c["num_hidden_layers"]
    linears = attention(c, L, False, False, fused="qkv_proj") + gated_mlp(H, c["intermediate_size"], False, L,
                                                                         fused=True)
    return build(c, linears, {"layer_norms": L * 2 * H, "norm": H},
                 layout=Layout(norm="lean", o_view=False, **fused_v(c)))


def phi(c: dict) -> ModelShapes:
    """Phi-1/1.5/2: q/k/v/dense and fc1/fc2, all with biases; one LayerNorm feeds attention and MLP in parallel."""
    H, L = c["hidden_size"], c["num_hidden_layers"]
    nh, kv, hd = heads(c)
    linears = attention(c, L, True, True, o_name="dense") + plain_mlp(H, c["intermediate_size"], True, L,
                                                                      ("fc1", "fc2"))
    norms = {"layer_norms": L * 2 * H, "norm": 2 * H}
    if c.get("qk_layernorm"):  # q_layernorm, k_layernorm over head_dim, weight + bias
        norms["qk_norms"] = L * 4 * hd
    return build(c, linears, norms, embed="embed_tokens", head_bias=c["vocab_size"],
                 layout=Layout(norm="layer", norms_per_layer=1, gated=False, parallel=True, o_view=False,
                               act_saved=act_saved(c.get("hidden_act", "gelu_new"))))


def starcoder2(c: dict) -> ModelShapes:
    H, L, b = c["hidden_size"], c["num_hidden_layers"], bool(c.get("use_bias", True))
    linears = attention(c, L, b, b) + plain_mlp(H, c["intermediate_size"], b, L, ("c_fc", "c_proj"))
    return build(c, linears, {"layer_norms": L * 4 * H, "norm": 2 * H}, tied_default=True,
                 layout=Layout(norm="layer", gated=False, act_saved=act_saved(c.get("hidden_act", "gelu"))))


def falcon(c: dict) -> ModelShapes:
    """Falcon: one fused query_key_value (multi-query: 1 kv head; new architecture: num_kv_heads), dense, and a
    plain 4x MLP; LayerNorms with biases; attention and MLP in parallel unless parallel_attn is false."""
    H, L, nh = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    hd, b = H // nh, bool(c.get("bias", False))
    new = bool(c.get("new_decoder_architecture", False))
    kv = c.get("num_kv_heads") or nh if new else (1 if c.get("multi_query", True) else nh)
    ffn = c.get("ffn_hidden_size") or 4 * H
    c = {**c, "num_key_value_heads": kv, "head_dim": hd, "intermediate_size": ffn}
    linears = (attention(c, L, b, b, o_name="dense", fused="query_key_value", prefix="self_attention")
               + plain_mlp(H, ffn, b, L, ("dense_h_to_4h", "dense_4h_to_h")))
    parallel = c.get("parallel_attn", True)
    n = 2 if (new and c.get("num_ln_in_parallel_attn") in (None, 2)) or not parallel else 1
    return build(c, linears, {"layer_norms": L * n * 2 * H, "norm": 2 * H}, embed="word_embeddings",
                 tied_default=True, intermediate=ffn,
                 layout=Layout(norm="layer", norms_per_layer=n, gated=False, parallel=n == 1 and parallel,
                               dense_mask=True, masks=1, **fused_v(c)))


def gpt_neox(c: dict) -> ModelShapes:
    H, L = c["hidden_size"], c["num_hidden_layers"]
    b = bool(c.get("attention_bias", True))
    c = {**c, "num_key_value_heads": c["num_attention_heads"]}
    linears = (attention(c, L, b, b, o_name="dense", fused="query_key_value", prefix="attention")
               + plain_mlp(H, c["intermediate_size"], True, L, ("dense_h_to_4h", "dense_4h_to_h")))
    # its rotary cats q into a contiguous (B, nh, S, hd) tensor, so SDPA's output comes back in that layout and
    # dense reads a (B, S, nh*hd) copy of it (o_view False), whatever partial_rotary_factor
    return build(c, linears, {"layer_norms": L * 4 * H, "norm": 2 * H}, embed="embed_in",
                 layout=Layout(norm="layer", gated=False, act_saved=act_saved(c.get("hidden_act", "gelu")),
                               o_view=False, norms_share_input=bool(c.get("use_parallel_residual", True)),
                               **fused_v(c)))


def gpt2(c: dict) -> ModelShapes:
    """GPT-2: Conv1D c_attn (fused qkv), attn.c_proj, mlp.c_fc, mlp.c_proj, all with biases, stored (in, out);
    learned positions (wpe)."""
    H, L, nh = c["n_embd"], c["n_layer"], c["n_head"]
    inner = c.get("n_inner") or 4 * H
    c = {**c, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nh,
         "max_position_embeddings": c.get("n_positions", 1024), "intermediate_size": inner}
    linears = (LinearShape("c_attn", H, 3 * H, True, L, path="attn.c_attn"),
               LinearShape("c_proj", H, H, True, L, path="attn.c_proj"),
               LinearShape("c_fc", H, inner, True, L, path="mlp.c_fc"),
               LinearShape("c_proj", inner, H, True, L, path="mlp.c_proj"))
    return build(c, linears, {"wpe": c["max_position_embeddings"] * H, "layer_norms": L * 4 * H, "norm": 2 * H},
                 embed="wte", tied_default=True,
                 layout=Layout(norm="layer", gated=False, scaled_embedding=True,  # layer 0 reads wte + wpe
                               act_saved=act_saved(c.get("activation_function", "gelu_new")),
                               attn_dropout=c.get("attn_pdrop", 0.1), resid_dropout=c.get("resid_pdrop", 0.1),
                               embd_dropout=c.get("embd_pdrop", 0.1)))


# model_type -> the config's own dropout probabilities its Layout models (masks, and what they change in attention)
MODELED_DROPOUTS = {"gpt2": ("attn_pdrop", "resid_pdrop", "embd_pdrop")}

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text", "olmo2", "cohere",
               "stablelm")
# model_type -> (rule, config.json keys it cannot do without)
DENSE = {**{t: (llama_like, _CORE) for t in _LLAMA_LIKE},
         "phi3": (phi3, _CORE), "phi": (phi, _CORE), "starcoder2": (starcoder2, _CORE),
         "falcon": (falcon, ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")),
         "gpt_neox": (gpt_neox, _CORE), "gpt2": (gpt2, ("n_embd", "n_layer", "n_head", "vocab_size"))}
