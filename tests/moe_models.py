"""Tiny random mixture-of-experts models (hidden 64, 2 layers, 4 experts, top-2) and GPT-NeoX, saved the way
transformers 5's save_pretrained writes them: the Hub layout (per-expert `experts.N.gate_proj.weight` tensors,
Mixtral's `block_sparse_moe`, GPT-NeoX's `embed_out`), which transformers converts back when it loads."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import make_tokenizer

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)
ARCHS = {  # name: (config class, model class, config kwargs)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                       num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                       head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
                         n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
                         first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=96)),
}
MOE = [a for a in ARCHS if a != "gpt_neox"]
NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "deepseek_v2": "DeepSeek-V2",
         "deepseek_v3": "DeepSeek-V3", "gpt_oss": "gpt-oss"}  # README's names (bench/arch_table.py)


def tiny_model(arch: str, vocab: int, pad: int, bos: int, eos: int, **overrides):
    """The random model of `arch` (fp32; on meta under accelerate's init_empty_weights)."""
    import transformers

    cfg_name, model_name, kwargs = ARCHS[arch]
    config = getattr(transformers, cfg_name)(vocab_size=vocab, pad_token_id=pad, eos_token_id=eos, bos_token_id=bos,
                                             **(COMMON | kwargs | overrides))  # DeepSeek's MLA: kv heads = heads
    return getattr(transformers, model_name)(config)


def make_moe_model(folder: Path, arch: str, seed: int = 0, dtype=torch.bfloat16, **overrides) -> Path:
    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = tiny_model(arch, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, **overrides).to(dtype)
    with torch.no_grad():  # random init is tiny (std 0.02); scale up so 4-bit errors and LoRA effects are visible
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3 if p.dim() == 2 else 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def reference(folder: Path, dtype=torch.float32, roundtrip=None, **load):
    """transformers' own model from `folder` (eager experts; `load`: more from_pretrained arguments), with every
    Linear weight and expert slice replaced by roundtrip(W (out, in)) when given (dequant(quant(W)): what a
    quantized base multiplies by)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation="eager", **load)
    if roundtrip is None:
        return model
    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and m is not lm_head:
                m.weight.copy_(roundtrip(m.weight))
            for proj in ("gate_up_proj", "down_proj"):
                p = getattr(m, proj, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                    t = getattr(m, "is_transposed", False)
                    for e in range(p.shape[0]):
                        w = p[e].t() if t else p[e]
                        w = roundtrip(w.contiguous())
                        p[e].copy_(w.t() if t else w)
    return model


def padded_batch(lengths, vocab=300, seed=1):
    """Token ids (B, T) and attention mask for rows of different lengths (right padding)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def make_mxfp4_gpt_oss(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny gpt-oss as released: its experts in MXFP4 (transformers' `P_blocks` (E, out, in/32, 16) uint8, two
    E2M1 codes a byte, low nibble first, and `P_scales` (E, out, in/32) E8M0 uint8), encoded by the gguf package's
    own MXFP4 quantizer and repacked from ggml's nibble order (byte j: codes j and j + 16 of the block), with
    transformers' quantization_config; everything else as the 16-bit model stores it. intermediate 64: MXFP4
    blocks are 32 inputs wide."""
    import json

    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize
    from safetensors.torch import load_file, save_file

    make_moe_model(folder, "gpt_oss", seed, **({"intermediate_size": 64} | overrides))
    state = load_file(str(folder / "model.safetensors"))
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = state.pop(name).float().transpose(1, 2).contiguous()  # (E, in, out) -> (E, out, in)
        E, R, K = w.shape
        q = torch.stack([torch.from_numpy(quantize(w[e].numpy(), GGMLQuantizationType.MXFP4).copy())
                         for e in range(E)]).reshape(E, R, K // 32, 17)  # a block: E8M0 byte, 16 bytes of codes
        ggml = q[..., 1:]
        codes = torch.cat((ggml & 0x0F, ggml >> 4), dim=-1)  # (E, R, G, 32) in element order
        state[name + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
        state[name + "_scales"] = q[..., 0].contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
