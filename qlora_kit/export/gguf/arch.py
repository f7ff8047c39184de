"""What llama.cpp needs to know about a Hugging Face architecture: its GGUF name, hyperparameter keys, tensor names,
and the one layout change (Llama's q/k row permutation). Used by `gguf_export`; no tensors are read here.

Tensor names come from the `gguf` package's own map (`gguf.get_tensor_name_map`), the table llama.cpp's converter
uses, so a rename in llama.cpp arrives with a `gguf` release instead of breaking a hand-written table
(unsloth #1495, #3504). Supported: Llama (tied embeddings too), Mistral (llama.cpp runs it as `llama`), Qwen2.

RoPE layout. Hugging Face Llama/Mistral checkpoints rotate pairs (i, i + d/2) of each head ("rotate_half"); llama.cpp's
`llama` graph rotates adjacent pairs (2i, 2i + 1), as Meta's original checkpoints did. llama.cpp's converter
therefore reorders the rows of q_proj and k_proj within each head: output row (h, 2i + j) <- input row (h, j·d/2 + i).
transformers' GGUF loader undoes it when reading. Qwen2 runs the NEOX (rotate_half) layout in llama.cpp: no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ExportError

# Hugging Face `architectures[0]` -> llama.cpp architecture name
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's: llama | qwen2
    hf: str  # LlamaForCausalLM ...
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int
    tied: bool  # output embeddings share token_embd (no output.weight in the file)
    config: dict

    @property
    def permutes_qk(self) -> bool:
        return self.name == "llama"


def arch_of(config: dict) -> Arch:
    """The Arch of a config.json, or an ExportError naming what is supported."""
    hf = (config.get("architectures") or ["?"])[0]
    name = ARCHITECTURES.get(hf)
    if name is None:
        raise ExportError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; this base is {hf}. "
                          "Use --format merged and convert that folder with llama.cpp's convert_hf_to_gguf.py.")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ExportError(f"GGUF export: the base uses RoPE scaling {rope.get('rope_type')!r}, which this exporter "
                          "does not write (llama.cpp needs extra tensors for it); only default and linear RoPE are "
                          "supported. Use --format merged and llama.cpp's convert_hf_to_gguf.py.")
    heads = config["num_attention_heads"]
    return Arch(name, hf, config["num_hidden_layers"], heads, config.get("num_key_value_heads") or heads,
                config.get("head_dim") or config["hidden_size"] // heads, bool(config.get("tie_word_embeddings")),
                config)


def _rope(config: dict) -> dict:
    """transformers >= 5 keeps rope_theta inside `rope_parameters`; older configs have `rope_theta` and
    `rope_scaling` at the top level."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def add_hparams(writer: Any, arch: Arch, vocab_size: int) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph (as its converter writes them)."""
    c = arch.config
    writer.add_block_count(arch.n_layers)
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    writer.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    writer.add_vocab_size(vocab_size)
    rope = _rope(c)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if arch.head_dim != c["hidden_size"] // arch.n_head:  # e.g. some Mistral variants: head_dim set explicitly
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
    if arch.name == "llama":
        writer.add_rope_dimension_count(arch.head_dim)
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


class TensorNames:
    """Hugging Face tensor name -> GGUF name, or None for tensors llama.cpp does not take (rotary inv_freq)."""

    def __init__(self, arch: Arch):
        import gguf

        self.map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch.name == "llama" else gguf.MODEL_ARCH.QWEN2,
                                            arch.n_layers)
        self.arch = arch

    def __call__(self, hf_name: str) -> str | None:
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if hf_name == "lm_head.weight" and self.arch.tied:
            return None  # tied: llama.cpp reuses token_embd when output.weight is absent
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: tensor {hf_name} of this {self.arch.hf} has no llama.cpp name; the base "
                              "has layers llama.cpp's graph does not know. Use --format merged.")
        return name

    def heads_to_permute(self, hf_name: str) -> int | None:
        """Number of heads whose rows to reorder (q_proj: n_head, k_proj: n_head_kv), or None."""
        if not self.arch.permutes_qk:
            return None
        if ".self_attn.q_proj." in hf_name:
            return self.arch.n_head
        if ".self_attn.k_proj." in hf_name:
            return self.arch.n_head_kv
        return None


def permute_rows(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """(out, ...) with out = n_head · d: row (h, j, i) -> (h, i, j) for j in {0, 1}, i < d/2 (module docstring)."""
    out = W.shape[0]
    return W.reshape(n_head, 2, out // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)
