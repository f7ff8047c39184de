"""RoPE as llama.cpp reads it: base, rotated dimensions and the scaling a config names.

    default   rope.freq_base (+ rope.dimension_count: head_dim · partial_rotary_factor)
    linear    rope.scaling.type linear, rope.scaling.factor: positions divided by the factor
    llama3    (Llama 3.1+) no key: a `rope_freqs` tensor of head_dim/2 per-frequency divisors, computed from the
              config as transformers' _compute_llama3_parameters does, which llama.cpp's llama graph divides by
    yarn      rope.scaling.type yarn, factor, original_context_length; beta_fast/slow when not llama.cpp's 32/1.
              The attention factor must be YaRN's own 0.1·ln(factor) + 1: llama.cpp applies it inside its rope.
              llama.cpp ramps from extrapolated to interpolated frequencies between whole dimensions: the
              correction range's ends rounded down/up (ggml_rope_yarn_corr_dims: floor/ceil), transformers' default
              `truncate: true`. With `truncate: false` (every released gpt-oss config.json) transformers ramps over
              the exact range (released gpt-oss: 8.09 to 17.40, llama.cpp 8 to 18). No file makes llama.cpp rotate
              that way: its gpt-oss graph passes no frequency-factor tensor to ggml_rope_ext (and its loader
              refuses a file with a rope_freqs tensor: tested), the ends are rounded whatever beta_fast/beta_slow
              say, and a ramp between whole dimensions has another slope. So the
              file is written as llama.cpp's own converter writes gpt-oss (the rounded ramp) and the export says so,
              with the size of the difference for the config (truncate_note). Measured in llama.cpp on a tiny
              gpt-oss with the released RoPE (head_dim 64): the rounded rule is what it computes (truncate: true
              matches transformers to 2.3e-5 in log-probability); against transformers' truncate: false the greedy
              tokens agree on prompts of 4-100 tokens with log-probabilities up to 3.3e-2 apart
              (tests/test_llama_cpp_gptoss.py), 0.17 on a 200-token prompt, and on a 500- and a 1000-token prompt
              the greedy tokens parted: the angles drift apart with position. A refusal would not spare anyone
              this: llama.cpp's converter run on the merged export writes the same file, silently
    longrope  (Phi-3 128k, Phi-3.5) rope_factors_long / rope_factors_short tensors (head_dim/2 each),
              rope.scaling.attn_factor sqrt(1 + ln(s)/ln(orig)), s = max_position_embeddings / original, and the
              original context length. llama.cpp picks the long factors when its context exceeds the original, for
              every prompt; transformers when the sequence does
    dynamic and the others: refused by name (llama.cpp has no dynamic NTK)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import ExportError

SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope")


def parameters(config: dict) -> dict:
    """The global-attention RoPE of a config: transformers >= 5 keeps it in `rope_parameters` (Gemma 3: one dict per
    layer type); older configs have `rope_theta` / `rope_scaling` at the top level."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    rope = dict(rope)
    rope.setdefault("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    rope.setdefault("rope_type", "default")
    return rope


def rotary_dims(config: dict, head_dim: int) -> int:
    rope = parameters(config)
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct", 1.0)))
    return int(head_dim * float(factor))


def check(config: dict, arch_name: str) -> None:
    rope = parameters(config)
    kind = rope["rope_type"]
    if kind not in SUPPORTED:
        why = ("llama.cpp has no dynamic NTK scaling" if kind == "dynamic"
               else f"this exporter writes only {', '.join(SUPPORTED)}")
        raise ExportError(f"GGUF export: the base uses RoPE scaling {kind!r} ({why}). Use --format merged.")
    if kind == "llama3" and arch_name != "llama":
        raise ExportError(f"GGUF export: llama3 RoPE scaling on a {arch_name} model: llama.cpp reads the rope_freqs "
                          "tensor only in its llama graph. Use --format merged.")
    if kind == "longrope" and arch_name != "phi3":
        raise ExportError(f"GGUF export: longrope RoPE scaling on a {arch_name} model: llama.cpp reads the rope factor "
                          "tensors only in its phi3 graph. Use --format merged.")
    if kind == "longrope" and (rope.get("attention_factor") is not None or rope.get("factor") is not None):
        raise ExportError("GGUF export: this longrope RoPE sets factor/attention_factor; llama.cpp derives them from "
                          "the context lengths. Use --format merged.")
    if kind == "yarn":
        factor = float(rope["factor"])
        att = rope.get("attention_factor")
        # DeepSeek's mscale/mscale_all_dim: llama.cpp's deepseek2 graph folds them into its attention scale
        # (families_moe checks them)
        deepseek = arch_name == "deepseek2"
        if (att is not None and abs(att - (0.1 * math.log(factor) + 1)) > 1e-6) or not deepseek and (
                rope.get("mscale") or rope.get("mscale_all_dim")):
            raise ExportError("GGUF export: this YaRN RoPE sets attention_factor/mscale, which llama.cpp "
                              "computes its own way (0.1·ln(factor) + 1). "
                              "Use --format merged.")


def add_keys(writer: Any, config: dict, head_dim: int) -> None:
    import gguf

    rope = parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(rotary_dims(config, head_dim))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(_original(config, rope))
        if rope.get("beta_fast", 32) != 32:
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow", 1) != 1:
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    elif kind == "longrope":
        orig = _original(config, rope)
        writer.add_rope_scaling_attn_factors(longrope_attention(config["max_position_embeddings"], orig))
        writer.add_rope_scaling_orig_ctx_len(orig)


def yarn_range(rope: dict, dim: int, truncate: bool) -> tuple[float, float]:
    """YaRN's correction range over the dim/2 frequencies: the dimensions that turn beta_fast and beta_slow times
    in the original context, clipped to [0, dim - 1]; `truncate` rounds the ends outwards (llama.cpp always)."""
    base, orig = float(rope["rope_theta"]), float(rope["original_max_position_embeddings"])

    def at(turns: float) -> float:
        return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))
    low, high = at(float(rope.get("beta_fast") or 32)), at(float(rope.get("beta_slow") or 1))
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(rope: dict, dim: int, truncate: bool) -> torch.Tensor:
    """(dim/2,) float64: YaRN's per-frequency rotation speed, interpolated (÷ factor) above the correction range,
    extrapolated (as is) below it, a linear ramp between."""
    low, high = yarn_range(rope, dim, truncate)
    high = high + 0.001 if high == low else high
    fast = 1.0 / float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    keep = 1 - ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return fast / float(rope["factor"]) * (1 - keep) + fast * keep


def truncate_note(config: dict, head_dim: int) -> list[str]:
    """The export note for YaRN with truncate: false (module docstring): what llama.cpp rotates differently and by
    how much, from the config in float64; [] for any other RoPE."""
    rope = parameters(config)
    if rope["rope_type"] != "yarn" or rope.get("truncate", True) is not False:
        return []
    dim = rotary_dims(config, head_dim)
    exact, rounded = yarn_inv_freq(rope, dim, False), yarn_inv_freq(rope, dim, True)
    (low, high), (rlow, rhigh) = yarn_range(rope, dim, False), yarn_range(rope, dim, True)
    gap = (exact - rounded).abs()
    rel = gap / exact
    i, drift = int(rel.argmax()), float(gap.max())
    return [f"RoPE: this YaRN sets truncate: false (as released gpt-oss does): transformers ramps the frequencies "
            f"over the exact correction range {low:.2f}-{high:.2f}, llama.cpp over whole dimensions {rlow}-{rhigh} "
            f"(floor/ceil; no GGUF key or tensor changes that in its graph). {int((gap > 0).sum())} of {dim // 2} "
            f"frequencies differ, by up to {float(rel[i]):.1%} (frequency {i}); the rotation angles drift apart by "
            f"up to {drift:.2e} rad per position: 0.1 rad by position {math.ceil(0.1 / drift)}, 1 rad by "
            f"{math.ceil(1 / drift)}. The GGUF is llama.cpp's own gpt-oss; the exact model is --format merged."]


def longrope_attention(context: int, original: int) -> float:
    """longrope's attention factor sqrt(1 + ln(s)/ln(original)), s = context / original (1 when not extended)."""
    scale = context / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


def _original(config: dict, rope: dict) -> int:
    orig = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if orig is None:
        raise ExportError(f"GGUF export: {rope['rope_type']} RoPE without original_max_position_embeddings; "
                          "llama.cpp needs it.")
    return int(orig)


def longrope_factors(config: dict, head_dim: int) -> dict[str, torch.Tensor]:
    """{'rope_factors_long.weight', 'rope_factors_short.weight'}: (rotary dims / 2,) fp32 each, or {}."""
    rope = parameters(config)
    if rope["rope_type"] != "longrope":
        return {}
    half = rotary_dims(config, head_dim) // 2
    out = {f"rope_factors_{k}.weight": torch.tensor(rope[f"{k}_factor"], dtype=torch.float32)
           for k in ("long", "short")}
    if any(t.shape != (half,) for t in out.values()):
        raise ExportError(f"GGUF export: longrope long/short factors must have {half} entries (rotary dims / 2).")
    return out


def llama3_factors(config: dict, head_dim: int) -> torch.Tensor | None:
    """(head_dim/2,) fp32: per frequency, the divisor llama3 scaling applies (1 for short wavelengths, `factor` for
    long ones, a smooth blend between), or None for other RoPE."""
    rope = parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    base, dim = float(rope["rope_theta"]), rotary_dims(config, head_dim)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old / high, torch.ones_like(freqs), torch.where(wavelen > old / low, factor, blended))
    return out.float()
