"""What llama.cpp needs to know about a Hugging Face architecture: its GGUF name, hyperparameter keys, tensor names
and layout changes (the per-family quirks are in `families`, RoPE in `rope`). No tensors are read here.

Tensor names come from the `gguf` package's own map (`gguf.get_tensor_name_map`), the table llama.cpp's converter
uses, so a rename in llama.cpp arrives with a `gguf` release instead of breaking a hand-written table
(unsloth #1495, #3504).

RoPE layout. Hugging Face Llama/Mistral/Granite checkpoints rotate pairs (i, i + d/2) of each head ("rotate_half");
llama.cpp's `llama` graph rotates adjacent pairs (2i, 2i + 1), as Meta's original checkpoints did. llama.cpp's
converter therefore reorders the rows of q_proj and k_proj within each head: output row (h, 2i + j) <- input row
(h, j·d/2 + i). transformers' GGUF loader undoes it when reading. The other families run the layout their checkpoint
has (NEOX rotate_half, or Cohere's interleaved pairs, which llama.cpp's command-r graph rotates as they are).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...errors import ExportError
from . import families, rope
from .families import Family

BUFFERS = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's: llama | qwen2 | gemma2 ...
    hf: str  # LlamaForCausalLM ...
    fam: Family
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int  # MLA: the rotary part (qk_rope_head_dim), what RoPE rotates
    tied: bool  # output embeddings share token_embd (no output.weight in the file)
    config: dict

    @property
    def permutes_qk(self) -> bool:
        return self.fam.permute_qk


def arch_of(config: dict) -> Arch:
    """The Arch of a config.json, or an ExportError naming what llama.cpp (or this exporter) does not run."""
    import gguf

    hf, fam = families.family_of(config)
    name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, fam.gguf)]
    rope.check(config, name)
    heads = families.n_heads(config)
    tied = fam.tied == "always" or bool(config.get("tie_word_embeddings", fam.gguf in ("FALCON", "GPT2")))
    head_dim = (config["qk_rope_head_dim"] if fam.mla else None) or config.get("head_dim") \
        or families.hidden(config) // heads
    return Arch(name, hf, fam, families.n_layers(config), heads, families.n_heads_kv(config, fam), head_dim, tied,
                config)


def add_hparams(writer: Any, arch: Arch, vocab_size: int) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph (as its converter writes them)."""
    c = arch.config
    writer.add_block_count(arch.n_layers)
    writer.add_context_length(families.context(c))
    writer.add_embedding_length(families.hidden(c))
    writer.add_feed_forward_length(families.ffn(c))
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    if arch.fam.layer_norm:
        writer.add_layer_norm_eps(families.norm_eps(c))
    else:
        writer.add_layer_norm_rms_eps(families.norm_eps(c))
    writer.add_vocab_size(vocab_size)
    # as the converter: when set (MLA writes its own lengths)
    if not arch.fam.mla and (c.get("head_dim") or arch.head_dim != families.hidden(c) // arch.n_head):
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
    if arch.fam.gguf != "GPT2":  # learned positions, no RoPE
        rope.add_keys(writer, c, arch.head_dim)
    if arch.fam.extra is not None:
        arch.fam.extra(writer, c)


def extra_tensors(arch: Arch) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the checkpoint does not have: llama3 RoPE's rope_freqs, longrope's factors."""
    factors = rope.llama3_factors(arch.config, arch.head_dim)
    out = rope.longrope_factors(arch.config, arch.head_dim)
    return out if factors is None else out | {"rope_freqs.weight": factors}


EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")


def group_experts(index: dict) -> tuple[dict, dict]:
    """MoE checkpoints store one 2-D weight per expert (...experts.<e>.w1.weight); llama.cpp one 3-D tensor per
    kind (ffn_gate_exps). Returns (index with each group under its expert-less name, the first expert's header
    standing for the group; {group name: headers in expert order})."""
    groups: dict[str, list] = {}
    out = {}
    for name, info in index.items():
        m = EXPERT.match(name)
        if m is None:
            out[name] = info
            continue
        key = f"{m.group(1)}.{m.group(3)}"
        groups.setdefault(key, []).append((int(m.group(2)), info))
        out.setdefault(key, info)
    for key, parts in groups.items():
        if sorted(e for e, _ in parts) != list(range(len(parts))):
            raise ExportError(f"GGUF export: the experts of {key} are not numbered 0..{len(parts) - 1}.")
    return out, {k: [i for _, i in sorted(v, key=lambda x: x[0])] for k, v in groups.items()}


class TensorNames:
    """Hugging Face tensor name -> GGUF name, or None for tensors llama.cpp does not take (buffers, tied lm_head)."""

    def __init__(self, arch: Arch):
        import gguf

        self.map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.fam.gguf), arch.n_layers)
        self.arch = arch

    def __call__(self, hf_name: str) -> str | None:
        if hf_name.endswith(BUFFERS):
            return None
        if hf_name == "lm_head.weight" and self.arch.tied:
            return None  # tied: llama.cpp reuses token_embd when output.weight is absent
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: tensor {hf_name} of this {self.arch.hf} has no llama.cpp name; the base "
                              "has layers llama.cpp's graph does not know. Use --format merged.")
        return name

    def pieces(self, hf_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], Callable | None]]:
        """The GGUF tensors one Hugging Face tensor of this shape becomes: [(GGUF name, shape, take(W) or None)],
        one as it is for most families; gpt-oss's fused experts and DeepSeek's kv_b_proj as two (families_moe)."""
        split = self.arch.fam.split
        parts = split(hf_name, shape, self.arch.config) if split is not None else None
        if parts is None:
            name = self(hf_name)
            return [] if name is None else [(name, shape, None)]
        return [(self(n), s, take) for n, s, take in parts]

    def transposed(self, hf_name: str) -> bool:
        """GPT-2 Conv1D weight, stored (in, out)."""
        parts = hf_name.split(".")
        return hf_name.endswith(".weight") and len(parts) > 1 and parts[-2] in self.arch.fam.conv1d

    def shift(self, hf_name: str) -> float:
        """Added to a norm weight (Gemma's 1 + w)."""
        return self.arch.fam.norm_shift if hf_name.endswith("norm.weight") else 0.0

    def rows(self, hf_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The output-row reordering of this tensor (weight or bias; an adapter's lora_b), or None."""
        a = self.arch
        if a.permutes_qk and ".self_attn.q_proj." in hf_name:
            return lambda W: permute_rows(W, a.n_head)
        if a.permutes_qk and ".self_attn.k_proj." in hf_name:
            return lambda W: permute_rows(W, a.n_head_kv)
        if a.fam.qkv == "neox" and ".query_key_value." in hf_name:
            return lambda W: group_qkv(W, a.n_head, 1, a.head_dim)
        if a.fam.qkv == "falcon" and ".query_key_value." in hf_name:
            return lambda W: group_qkv(W, a.n_head_kv, a.n_head // a.n_head_kv, a.head_dim)
        return None


def permute_rows(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """(out, ...) with out = n_head · d: row (h, j, i) -> (h, i, j) for j in {0, 1}, i < d/2 (module docstring)."""
    out = W.shape[0]
    return W.reshape(n_head, 2, out // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def group_qkv(W: torch.Tensor, groups: int, q_per_group: int, d: int) -> torch.Tensor:
    """Rows stored as (groups, q_per_group + 2, d) [q heads of the group, its k, its v] -> [all q | all k | all v].
    GPT-NeoX: groups = n_head, one q each; Falcon: groups = n_kv."""
    x = W.reshape(groups, q_per_group + 2, d, *W.shape[1:])
    q = x[:, :q_per_group].reshape(-1, *W.shape[1:])
    k, v = x[:, q_per_group].reshape(-1, *W.shape[1:]), x[:, q_per_group + 1].reshape(-1, *W.shape[1:])
    return torch.cat([q, k, v])
