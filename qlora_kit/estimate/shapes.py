"""Parameter shapes of a decoder from its config.json dict: one decoder layer's Linears, and what stays unquantized."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError
from ..terms import bad_config_sizes

# config.json keys that may be absent, with the defaults transformers' LlamaConfig uses for them.
KNOWN_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # same layer layout; MoE or other layouts would be miscounted
_OPTIONAL = {"num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False, "attention_bias": False,
             "mlp_bias": False, "max_position_embeddings": 2048, "model_type": "llama"}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")



@dataclass(frozen=True)
class LinearShape:
    name: str  # Hugging Face module name inside a decoder layer: q_proj, ..., down_proj
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShapes:
    """Parameter shapes of a Llama-like decoder (llama, mistral, qwen2, qwen3). Every layer is identical."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tied: bool
    linears: tuple[LinearShape, ...]  # one decoder layer's Linears
    other: dict[str, int]  # numel of the parameters that stay unquantized, by name

    @property
    def linear_params(self) -> int:
        return self.layers * sum(lin.numel for lin in self.linears)

    @property
    def total(self) -> int:
        return self.linear_params + sum(self.other.values())


def count_params(config: dict) -> ModelShapes:
    """Shapes from a config.json dict. head_dim absent -> hidden // heads; tied embeddings count once."""
    missing = [k for k in _REQUIRED if not isinstance(config.get(k), int)]
    if missing:
        raise ModelError(f"config.json lacks {', '.join(missing)}: estimate knows decoder-only Llama-like models "
                         "(llama, mistral, qwen2, qwen3)")
    bad = bad_config_sizes(config)
    if bad:
        raise ModelError(f"config.json has sizes that are not positive integers: {', '.join(bad)}")
    c = {**_OPTIONAL, **{k: v for k, v in config.items() if v is not None}}
    if c["model_type"] not in KNOWN_TYPES:
        raise ModelError(f"model_type {c['model_type']!r} is not a layout estimate knows ({', '.join(KNOWN_TYPES)}); "
                         "its memory would be miscounted")
    H, I, L, nh, V = (c[k] for k in _REQUIRED)
    kv = c["num_key_value_heads"] or nh
    hd = c["head_dim"] or H // nh
    qwen2 = c["model_type"] == "qwen2"  # Qwen2 always has q/k/v biases, never an o_proj bias
    qkv_bias, o_bias, mlp_bias = qwen2 or c["attention_bias"], not qwen2 and c["attention_bias"], c["mlp_bias"]
    linears = (LinearShape("q_proj", H, nh * hd, qkv_bias), LinearShape("k_proj", H, kv * hd, qkv_bias),
               LinearShape("v_proj", H, kv * hd, qkv_bias), LinearShape("o_proj", nh * hd, H, o_bias),
               LinearShape("gate_proj", H, I, mlp_bias), LinearShape("up_proj", H, I, mlp_bias),
               LinearShape("down_proj", I, H, mlp_bias))
    other = {"embed_tokens": V * H, "layer_norms": L * 2 * H, "norm": H,
             "linear_biases": L * sum(lin.out_features for lin in linears if lin.bias)}
    if c["model_type"] == "qwen3":
        other["qk_norms"] = L * 2 * hd  # q_norm, k_norm over the head dimension
    if not c["tie_word_embeddings"]:
        other["lm_head"] = V * H
    return ModelShapes(c["model_type"], H, I, L, nh, kv, hd, V, c["max_position_embeddings"],
                       bool(c["tie_word_embeddings"]), linears, other)
