"""count_params for every architecture against transformers' own model classes: each tiny random model is built on
the meta device (no memory, milliseconds) and every Linear / fused expert the estimate counts must exist there with
exactly its shape, in exactly the layers it names, and the totals must equal the real parameter count."""

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import transformers as T

from qlora_kit.estimate import analytic as me

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0)
NEOX = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
MOE = dict(num_experts_per_tok=2)
MLA = dict(n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **MOE)

CASES = {
    "llama": (T.LlamaConfig, dict(attention_bias=True, mlp_bias=True, head_dim=24)),
    "mistral": (T.MistralConfig, {}),
    "qwen2": (T.Qwen2Config, {}),
    "qwen3": (T.Qwen3Config, dict(head_dim=24)),
    "granite": (T.GraniteConfig, dict(attention_bias=True)),
    "gemma": (T.GemmaConfig, dict(head_dim=16)),
    "gemma2": (T.Gemma2Config, dict(head_dim=16, tie_word_embeddings=False)),
    "gemma3_text": (T.Gemma3TextConfig, dict(head_dim=24)),
    "olmo2": (T.Olmo2Config, {}),
    "cohere": (T.CohereConfig, {}),
    "cohere-qk-norm": (T.CohereConfig, dict(use_qk_norm=True)),
    "stablelm": (T.StableLmConfig, {}),
    "stablelm-qk": (T.StableLmConfig, dict(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True)),
    "phi3": (T.Phi3Config, {}),
    "phi": (T.PhiConfig, {}),
    "phi-qk": (T.PhiConfig, dict(qk_layernorm=True)),
    "starcoder2": (T.Starcoder2Config, {}),
    "falcon": (T.FalconConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                    pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "falcon-new": (T.FalconConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                        new_decoder_architecture=True, num_kv_heads=2, bias=True, ffn_hidden_size=96,
                                        pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "falcon-serial": (T.FalconConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=128, parallel_attn=False, multi_query=False,
                                           pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": (T.GPTNeoXConfig, NEOX),
    "gpt2": (T.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256, bos_token_id=0,
                                eos_token_id=0)),
    "mixtral": (T.MixtralConfig, dict(num_local_experts=4, **MOE)),
    "qwen2_moe": (T.Qwen2MoeConfig, dict(num_experts=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, mlp_only_layers=[1], **MOE)),
    "qwen3_moe": (T.Qwen3MoeConfig, dict(num_experts=4, moe_intermediate_size=32, decoder_sparse_step=2, **MOE)),
    "deepseek_v2": (T.DeepseekV2Config, MLA),
    "deepseek_v2-lite": (T.DeepseekV2Config, {**MLA, "q_lora_rank": None}),
    "deepseek_v3": (T.DeepseekV3Config, MLA),
    "gpt_oss": (T.GptOssConfig, dict(num_local_experts=4, head_dim=16, **MOE)),
}


def _build(name):
    cls, extra = CASES[name]
    base = {} if cls in (T.FalconConfig, T.GPT2Config) else (NEOX if cls is T.GPTNeoXConfig else TINY)
    config = cls(**{**base, **extra})
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    return config, model


def _by_layer(model) -> dict[str, dict[int, tuple]]:
    """'self_attn.q_proj.weight' -> {layer index: shape} over every decoder layer."""
    out: dict[str, dict[int, tuple]] = {}
    for n, p in model.named_parameters():
        m = re.search(r"\.(?:layers|h)\.(\d+)\.(.+)$", n)
        if m:
            out.setdefault(m.group(2), {})[int(m.group(1))] = tuple(p.shape)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_count_params_equals_transformers(name):
    config, model = _build(name)
    d = config.to_dict()
    d.pop("transformers_version", None)
    s = me.count_params(d)
    real = _by_layer(model)
    quantized = 0
    for lin in s.linears:
        fused = lin.experts > 1 or lin.path.startswith("mlp.experts.")
        weight = lin.path if fused else lin.path + ".weight"
        assert weight in real, f"{name}: {weight} is not a parameter of {type(model).__name__}"
        shapes = real[weight]
        assert len(shapes) == lin.layers, f"{name}: {weight} is in {len(shapes)} layers, counted in {lin.layers}"
        for shape in shapes.values():
            if fused:  # (E, out, in) as transformers holds fused experts; gpt-oss stores (E, in, out)
                assert shape[0] == lin.experts and sorted(shape[1:]) == sorted((lin.out_features, lin.in_features))
                expect = (lin.experts, lin.in_features, lin.out_features) if name == "gpt_oss" else \
                    (lin.experts, lin.out_features, lin.in_features)
                assert shape == expect, (name, weight, shape)
            elif isinstance(model.get_submodule("transformer.h.0." + lin.path) if name == "gpt2" else None,
                            T.pytorch_utils.Conv1D):
                assert shape == (lin.in_features, lin.out_features)  # GPT-2's Conv1D stores (in, out)
            else:
                assert shape == (lin.out_features, lin.in_features), (name, weight, shape)
        bias = real.get(lin.path + ("_bias" if fused else ".bias"), {})
        assert len(bias) == (lin.layers if lin.bias else 0), (name, lin.path, "bias")
        quantized += sum(torch.Size(sh).numel() for sh in shapes.values())
    assert quantized == s.linear_params
    assert s.total == sum(p.numel() for p in model.parameters()), name
    assert s.tied == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    assert s.vocab == model.get_input_embeddings().weight.shape[0]
    assert s.layers == config.get_text_config().num_hidden_layers if hasattr(config, "num_hidden_layers") else True
    # every Linear or fused expert of a decoder layer but the routers is counted as quantized (all-linear's set)
    counted = {lin.path for lin in s.linears}
    routers = {"mlp.gate", "mlp.router", "mlp.shared_expert_gate"}
    for n, mod in model.named_modules():
        m = re.search(r"\.(?:layers|h)\.\d+\.(.+)$", n)
        if m and isinstance(mod, (torch.nn.Linear, T.pytorch_utils.Conv1D)) and m.group(1) not in routers:
            assert m.group(1) in counted, f"{name}: {m.group(1)} is a Linear the estimate does not count"


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_moe_total_vs_active(name):
    config, _ = _build(name)
    s = me.count_params(config.to_dict())
    e = me.estimate(config.to_dict(), me.EstimateConfig(batch=1, seq=64, device="cpu"))
    experts = [lin for lin in s.linears if lin.experts > 1]
    assert experts and s.moe is not None and s.moe.top_k == 2
    assert "router" in s.other and s.other["router"] >= s.moe.layers * s.moe.experts * s.hidden
    # all experts resident and quantized; one LoRA pair per expert per projection
    assert e.components["quantized_weights"] > sum(lin.count * lin.numel for lin in experts) // 2 - 1
    assert e.adapter_params >= sum(lin.count * 16 * (lin.in_features + lin.out_features) for lin in experts)
    # activations follow the top-k experts of a token, not all of them
    assert s.active_intermediate == 2 * s.moe.intermediate + s.moe.shared


def test_unknown_layout_names_the_known_ones():
    with pytest.raises(me.ModelError, match="'mamba' is not a layout estimate knows.*Known: llama"):
        me.count_params({"model_type": "mamba", "hidden_size": 64})
    with pytest.raises(me.ModelError, match="did you mean qwen3_moe"):
        me.count_params({"model_type": "qwen3-moe"})
    with pytest.raises(me.ModelError, match="lacks n_layer, n_head, vocab_size"):
        me.count_params({"model_type": "gpt2", "n_embd": 768})


# The dense architectures as their tiny models train: hidden 64, MLP 192, 4 heads, 2 kv heads.
DENSE = {name: CASES[name] for name in ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2",
                                        "gemma3_text", "olmo2", "cohere", "stablelm", "phi3", "phi", "starcoder2",
                                        "falcon", "gpt_neox")}
# GPT-NeoX without the parallel residual (its second LayerNorm reads attention's output + x) and rotary over whole
# heads (q, k still rebuilt by a cat)
DENSE["gpt_neox_sequential"] = (T.GPTNeoXConfig, {**NEOX, "use_parallel_residual": False, "rotary_pct": 1.0})


def _saved_by_decoder(name: str, layers: int, B: int, S: int):
    """Bytes autograd saves in the decoder's forward of a QLoRA model (nf4 base, LoRA r 8 on all-linear, frozen
    base, lean norms: as prepare() builds it), and the config."""
    from qlora_kit.adapters.lora import LoraSpec, inject
    from qlora_kit.lowmem.lean_norm import make_lean
    from qlora_kit.quant.bnb import QuantLinear, QuantSpec

    cls, extra = DENSE[name]
    base = {k: v for k, v in TINY.items() if k != "num_key_value_heads" or cls is not T.GPTNeoXConfig}
    if cls is T.FalconConfig:
        base = {}
    config = cls(**{**base, **extra, "num_hidden_layers": layers,
                    **({"intermediate_size": 192} if cls is not T.FalconConfig else {})})
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for n, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                bias = child.bias.data if child.bias is not None else None
                setattr(parent, n, QuantLinear.from_weight(child.weight.data, QuantSpec("nf4", 64, True), bias))
    inject(model, "all-linear", LoraSpec(r=8, alpha=16, dropout=0.05))  # replayed masks: 1 byte each
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    make_lean(model)
    model.train()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # use_cache=False as training runs: a KV cache would hand SDPA k, v as cat copies, not the views they are
        model.get_decoder()(input_ids=torch.randint(0, 128, (B, S)), use_cache=False)
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(n for ptr, n in saved.items() if ptr not in frozen), config


@pytest.mark.parametrize("name", list(DENSE))
def test_layer_activations_equal_saved_tensors_every_dense_layout(name):
    """One decoder layer's saved tensors (a 2-layer decoder's minus a 1-layer decoder's, so embeddings, masks and
    rotary tables cancel) equal layer_activations exactly: norms lean or transformers' own (fp32 copies), LayerNorm
    statistics, parallel attention + MLP, fused q/k/v, partial rotary, eager softcapped attention, gelu_new."""
    B, S = (2, 40) if len(name) % 2 else (3, 24)  # two batch shapes, neither a power of two
    one, _ = _saved_by_decoder(name, 1, B, S)
    two, config = _saved_by_decoder(name, 2, B, S)
    s = me.count_params(config.to_dict())
    cfg = me.EstimateConfig(rank=8, batch=B, seq=S, lora_dropout=0.05, device="cpu")
    assert two - one == sum(me.layer_activations(s, cfg, me.resolve_targets(s, "all-linear")).values())


def test_builtin_moe_shapes_and_what_fits():
    """The built-in MoE shapes give their model cards' parameter counts (Qwen3-30B-A3B: 30.5B total, 3.3B
    activated; gpt-oss-20b: 21B total), and the 16 / 24 GiB answer is consistent with the estimate itself."""
    from dataclasses import replace

    qwen, oss = (me.load_model_config(n) for n in ("qwen3-30b-a3b", "gpt-oss-20b"))
    q, o = me.count_params(qwen), me.count_params(oss)
    assert q.total == pytest.approx(30.5e9, rel=0.01) and q.active == pytest.approx(3.3e9, rel=0.02)
    assert o.total == pytest.approx(20.9e9, rel=0.01) and o.moe.experts == 32 and o.moe.top_k == 4
    assert "lm_head" in q.other and "router" in o.other and o.layout.sliding_window == 128
    cfg = me.EstimateConfig(batch=1)
    for config in (qwen, oss):
        for row in me.max_seq_table(config, cfg, gpus_gib=(16, 24)):
            if row["max_seq"] is None:
                assert me.estimate(config, replace(cfg, seq=1)).total > row["gpu_bytes"]
            else:
                assert me.estimate(config, replace(cfg, seq=row["max_seq"])).total <= row["gpu_bytes"]
    # all-linear adapts every expert: Qwen3-30B-A3B's 6,144 experts make r 16 too big for 24 GiB at 2048 tokens,
    # attention-only adapters fit
    assert me.estimate(qwen, replace(cfg, seq=2048)).total > 24 * me.GiB
    attn = replace(cfg, seq=2048, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert me.estimate(qwen, attn).total < 24 * me.GiB < me.estimate(qwen, replace(cfg, seq=2048)).total
