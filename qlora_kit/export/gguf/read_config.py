"""A GGUF model's metadata back to a Hugging Face config.json: the inverse of `arch.add_hparams`, `rope.add_keys` and
each family's `extra` keys, for the families `families.FAMILIES` writes (gpt-oss's and DeepSeek's own keys in
`read_config_moe`).

    family      which FAMILIES entry wrote the file: the one whose llama.cpp architecture it names (general.
                architecture) and whose MoE-ness matches (an expert count: Mixtral, not Llama); the first such entry
                (Llama for llama.cpp's `llama` without experts: a Mistral GGUF runs as Llama, as llama.cpp runs it)
    widths      block count, embedding / feed-forward lengths, heads, kv heads, key length (an explicit head_dim),
                context length and the norm epsilon, each under the key the config class keeps it in
    RoPE        freq_base, dimension_count (partial_rotary_factor), linear / YaRN keys; longrope's factor tensors
                back to long_factor / short_factor; llama3's rope_freqs tensor is applied to the built model's
                inv_freq by the reader (the divisors it holds are what llama.cpp multiplies by; the four llama3
                parameters that made them are not in the file)
    extra       the family's own keys (softcapping, sliding window, logit / embedding / residual scales, expert
                counts, parallel residual) and what llama.cpp's graph for the family fixes (Gemma's query scale is
                head_dim, Qwen3-MoE renormalises its top-k router weights, Falcon's layout from its tensors)
    unread      every `<arch>.*` key must have been read (vocab_size aside; value_length and longrope's attention
                factor checked against what transformers derives): a key another converter writes that this reader
                would drop is refused by name, not read as another model
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ...errors import ModelError
from . import families, families_moe, read_config_moe
from .families import FAMILIES, Family

EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")  # families.norm_eps reads these
FFN_KEYS = ("ffn_hidden_size", "intermediate_size", "n_inner")  # families.ffn
KV_KEYS = ("num_key_value_heads", "num_kv_heads")  # families.n_heads_kv
EXPERT_KEYS = ("num_local_experts", "num_experts")  # families._moe
# the `extra` writers that write expert_count: a file with the key is one of their families (Mixtral, not Llama)
MOE_EXTRAS = (families._moe, families_moe.gpt_oss_hparams, families_moe.deepseek_hparams)


def family_of(arch: str, meta: dict) -> tuple[str, Family]:
    """(Hugging Face architecture, Family) that writes llama.cpp's `arch`, or a ModelError naming what is read."""
    import gguf

    moe = f"{arch}.expert_count" in meta
    for hf, fam in FAMILIES.items():
        if gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, fam.gguf)] != arch:
            continue
        if fam.mla:  # DeepSeek-V2 and V3 share llama.cpp's deepseek2: the router tells them apart
            hf = read_config_moe.deepseek_class(meta, arch)
            return hf, FAMILIES[hf]
        if (fam.extra in MOE_EXTRAS) == moe:
            return hf, fam
    known = sorted({gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, f.gguf)] for f in FAMILIES.values()})
    raise ModelError(f"this GGUF's architecture is {arch!r}{' with experts' if moe else ''}, which qlora-kit's GGUF "
                     f"reader does not map back to a transformers model (it reads {', '.join(known)}). Evaluate the "
                     "model folder it came from, or run the GGUF in llama.cpp.")


def _model_type(hf: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # text-only Gemma 3 is gemma3_text; the first model type whose causal-LM class is this one
    types = [t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == hf]
    return "gemma3_text" if "gemma3_text" in types else types[0]


def config_of(meta: dict, tensors: dict[str, tuple[int, ...]], longrope: dict) -> tuple[Any, Family, Any]:
    """(transformers config, Family, rope_freqs tensor name or None) for a GGUF model. `meta`: key -> value;
    `tensors`: GGUF name -> shape in numpy (row-major) order; `longrope`: {long_factor, short_factor} lists read
    from the rope_factors tensors, or {}."""
    from transformers import AutoConfig

    meta = _Read(meta)
    arch = meta["general.architecture"]
    hf, fam = family_of(arch, meta)
    model_type = _model_type(hf)
    stored = AutoConfig.for_model(model_type).to_dict()  # which key this config class keeps each value under

    def get(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    def put(keys: tuple[str, ...], value) -> None:
        key = next((k for k in keys if k in stored), keys[0])
        c[key] = value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    # MLA: RoPE rotates qk_rope_head_dim of each head; its key/value lengths are the latent's (read_config_moe)
    head_dim = int(get("rope.dimension_count")) if fam.mla else int(get("attention.key_length") or hidden // heads)
    c: dict[str, Any] = {
        "architectures": [hf], "vocab_size": int(tensors["token_embd.weight"][0]), "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors}
    put(FFN_KEYS, int(get("feed_forward_length")))
    put(KV_KEYS, int(get("attention.head_count_kv", heads)))
    put(EPS_KEYS, float(get("attention.layer_norm_rms_epsilon", get("attention.layer_norm_epsilon"))))
    if not fam.mla and get("attention.key_length") is not None:
        c["head_dim"] = head_dim
    for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        c[key] = meta.get(f"tokenizer.ggml.{gkey}")
    rope_freqs = _rope(c, meta, arch, tensors, head_dim, fam, longrope)
    back = BACK.get(fam.extra)
    if back is not None:
        back(c, get, stored)
    FIXED.get(fam.gguf, lambda c, t: None)(c, tensors)
    _check_derived(c, get, head_dim, longrope, fam)
    unread = sorted(k for k in meta.keys() if k.startswith(f"{arch}.") and k not in meta.seen | {f"{arch}.vocab_size"})
    if unread:  # a foreign file's key this reader would drop: another model, silently
        raise ModelError(f"this GGUF sets {', '.join(unread)}, which qlora-kit's GGUF reader does not map to "
                         f"transformers' {hf}: the model read would not be the file's. Run it in llama.cpp, or "
                         "evaluate the model folder it came from.")
    return AutoConfig.for_model(model_type, **c), fam, rope_freqs


class _Read(dict):
    """The metadata, remembering which keys were looked at (the rest must be keys the reader may ignore)."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.seen: set[str] = set()

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


def _check_derived(c: dict, get, head_dim: int, longrope: dict, fam: Family) -> None:
    """Keys transformers derives itself from the config: they must be what it derives."""
    from .rope import longrope_attention

    value = get("attention.value_length")
    if not fam.mla and value is not None and int(value) != head_dim:
        raise ModelError(f"this GGUF's value heads are {value} wide and its key heads {head_dim}: transformers' "
                         "model classes read here have one head width.")
    attn = get("rope.scaling.attn_factor")
    if attn is not None and not (longrope and math.isclose(
            float(attn), longrope_attention(c["max_position_embeddings"], c["original_max_position_embeddings"]),
            rel_tol=1e-6)):
        raise ModelError(f"this GGUF's RoPE attention factor {attn} is not the one transformers computes for its "
                         "RoPE scaling; the model read would not be the file's.")


def _rope(c: dict, meta: dict, arch: str, tensors: dict, head_dim: int, fam: Family, longrope: dict) -> str | None:
    """rope_parameters (the inverse of rope.add_keys and rope.longrope_factors); the rope_freqs tensor's name when
    the file has llama3 divisors."""
    import gguf

    if fam.gguf == "GPT2":
        return None
    r: dict[str, Any] = {"rope_type": "default", "rope_theta": float(meta[f"{arch}.rope.freq_base"])}
    dims = meta.get(f"{arch}.rope.dimension_count")
    if dims is not None and int(dims) != head_dim:
        r["partial_rotary_factor"] = int(dims) / head_dim
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == gguf.RopeScalingType.LINEAR.value:
        r |= {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    elif kind == gguf.RopeScalingType.YARN.value:
        r |= {"rope_type": "yarn", "factor": float(meta[f"{arch}.rope.scaling.factor"]),
              "original_max_position_embeddings": int(meta[f"{arch}.rope.scaling.original_context_length"])}
        for key in ("beta_fast", "beta_slow"):
            if f"{arch}.rope.scaling.yarn_{key}" in meta:
                r[key] = float(meta[f"{arch}.rope.scaling.yarn_{key}"])
        if fam.mla:
            r |= read_config_moe.deepseek_yarn(meta, arch)
    elif kind not in ("none", None):
        raise ModelError(f"this GGUF uses RoPE scaling {kind!r}, which qlora-kit's GGUF reader does not map back.")
    if longrope:
        orig = int(meta[f"{arch}.rope.scaling.original_context_length"])
        r |= {"rope_type": "longrope", "original_max_position_embeddings": orig, **longrope}
        c["original_max_position_embeddings"] = orig
    if fam.gguf == "GEMMA3":  # llama.cpp's gemma3 graph: sliding layers at base 10000, unscaled (families.py)
        c["rope_parameters"] = {"full_attention": r, "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 10000.0}}
    else:
        c["rope_parameters"] = r
    return "rope_freqs.weight" if "rope_freqs.weight" in tensors else None


def _moe(c, get, stored):
    key = next((k for k in EXPERT_KEYS if k in stored), EXPERT_KEYS[0])
    c[key] = int(get("expert_count"))
    c["num_experts_per_tok"] = int(get("expert_used_count"))
    if get("expert_feed_forward_length") is not None:
        c["moe_intermediate_size"] = int(get("expert_feed_forward_length"))
    if get("expert_shared_feed_forward_length") is not None:
        c["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
    if "decoder_sparse_step" in stored:  # every layer sparse (families refuses the others)
        c |= {"decoder_sparse_step": 1, "mlp_only_layers": []}


def _softcap(value):
    return float(value) if value else None  # the writer stores a missing cap as 0


def _gemma2(c, get, stored):
    c |= {"attn_logit_softcapping": _softcap(get("attn_logit_softcapping")),
          "final_logit_softcapping": _softcap(get("final_logit_softcapping")),
          "sliding_window": int(get("attention.sliding_window"))}


def _gemma3(c, get, stored):
    c |= {"sliding_window": int(get("attention.sliding_window")),
          "final_logit_softcapping": _softcap(get("final_logit_softcapping"))}


def _phi3(c, get, stored):
    window = get("attention.sliding_window")
    c["sliding_window"] = int(window) if window else None


def _parallel(c, get, stored):
    c["use_parallel_residual"] = bool(get("use_parallel_residual", True))


def _cohere(c, get, stored):
    c["logit_scale"] = float(get("logit_scale"))


def _granite(c, get, stored):
    c |= {"embedding_multiplier": float(get("embedding_scale", 1.0)),
          "residual_multiplier": float(get("residual_scale", 1.0)),
          "attention_multiplier": float(get("attention.scale", 1.0)), "logits_scaling": float(get("logit_scale", 1.0))}


BACK: dict[Callable | None, Callable] = {  # each family's `extra` writer -> its reader
    families._moe: _moe, families._gemma2: _gemma2, families._gemma3: _gemma3, families._phi3: _phi3,
    families._parallel: _parallel, families._cohere: _cohere, families._granite: _granite,
    families_moe.gpt_oss_hparams: read_config_moe.gpt_oss, families_moe.deepseek_hparams: read_config_moe.deepseek}


def _head_dim_scale(c, tensors):
    c["query_pre_attn_scalar"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _falcon(c, tensors):
    new = "blk.0.attn_norm_2.weight" in tensors  # the new decoder architecture has two input LayerNorms
    kv = c.pop("num_kv_heads", c.pop("num_key_value_heads", 1))
    c |= {"new_decoder_architecture": new, "parallel_attn": True, "bias": False, "alibi": False}
    c |= {"num_kv_heads": kv} if new else {"multi_query": kv == 1}


def _qwen3moe(c, tensors):
    c["norm_topk_prob"] = True


def _qwen2moe(c, tensors):
    c["norm_topk_prob"] = False


def _stablelm(c, tensors):
    c |= {"use_qkv_bias": "blk.0.attn_q.bias" in tensors, "qk_layernorm": False}


def _no_window(c, tensors):  # llama.cpp runs these with full attention; the file has no window
    c["sliding_window"] = None


FIXED: dict[str, Callable[[dict, dict], None]] = {  # what llama.cpp's graph for the family fixes (families.refuse)
    "GEMMA2": _head_dim_scale, "GEMMA3": _head_dim_scale, "FALCON": _falcon, "QWEN3MOE": _qwen3moe,
    "QWEN2MOE": _qwen2moe, "STABLELM": _stablelm, "STARCODER2": _no_window}
