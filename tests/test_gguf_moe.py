"""Mixture-of-experts GGUF checked without llama.cpp (tests/test_llama_cpp_moe.py runs the files in llama.cpp):

- K-quants: every tensor's type as llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) picks it, stated here
  per file type from that source, on 4-layer models (use_more_bits picks layers 2 and 3 of 4): 8 experts (its
  n_expert == 8 rules), a shared expert, grouped-query ratio 4, tied embeddings, rows that fall back;
- expert LoRA: the merged GGUF's expert stacks equal PEFT's merge into transformers' fused expert tensors, and the
  adapter GGUF holds PEFT's per-expert pairs stacked as llama.cpp's convert_lora_to_gguf.py stacks them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gguf_models import adapter, build, peft_merged
from qlora_kit.errors import ExportError
from qlora_kit.export import formats as ex
from qlora_kit.export.shards import tensor_index

gguf = pytest.importorskip("gguf")
LAYERS = {"num_hidden_layers": 4}
MORE = ("{0}", "{0}", "Q6_K", "Q6_K")  # q4_k_m/q5_k_m: use_more_bits(i, 4) is true for layers 2 and 3
F32 = "F32"

# model name -> (build overrides, {file type: {tensor: type, or one type per layer}}); 2-D tensors not listed take
# the file's base type, written {0}; 1-D tensors, norms and the router ffn_gate_inp stay F32
CASES = {
    # 8 experts: attn_v and attn_k Q8_0 in every K type, attn_output Q5_K in q2_k..q4_k_m; no tied embeddings
    "mixtral": (LAYERS | {"num_local_experts": 8, "intermediate_size": 256}, {
        "q4_k_m": {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "attn_output": "Q5_K", "ffn_down_exps": MORE},
        "q5_k_m": {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "ffn_down_exps": MORE},
        "q6_k": {"attn_v": "Q8_0", "attn_k": "Q8_0"},
        "q4_k_s": {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "attn_output": "Q5_K"},
        "q3_k_m": {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "attn_output": "Q5_K",
                   "ffn_down_exps": "Q4_K"},
        "q2_k": {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "attn_output": "Q5_K",
                 "ffn_down_exps": "Q3_K"},
        "q3_k_s": {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "attn_output": "Q5_K"},
        "q3_k_l": {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0", "ffn_down_exps": "Q5_K"},
        "q5_k_s": {"output": "Q6_K", "attn_v": "Q8_0", "attn_k": "Q8_0"},
    }),
    # 4 experts and a shared expert whose 320-wide down rows are not 256-blocks (Q4_K -> Q5_0, Q6_K -> Q8_0,
    # Q3_K -> Q4_0); its (1, hidden) gate is 1-D to ggml; grouped-query ratio 2
    "qwen2moe": (LAYERS | {"shared_expert_intermediate_size": 320}, {
        "q4_k_m": {"output": "Q6_K", "attn_v": MORE, "ffn_down_exps": MORE, "ffn_down_shexp": ("Q5_0", "Q5_0", "Q8_0",
                                                                                              "Q8_0")},
        "q5_k_m": {"output": "Q6_K", "attn_v": MORE, "ffn_down_exps": MORE, "ffn_down_shexp": ("Q5_1", "Q5_1", "Q8_0",
                                                                                              "Q8_0")},
        "q3_k_m": {"output": "Q6_K", "attn_v": ("Q5_K", "Q5_K", "Q4_K", "Q4_K"), "attn_output": "Q4_K",
                   "ffn_down_exps": "Q4_K", "ffn_down_shexp": "Q5_0"},
        "q2_k": {"output": "Q6_K", "attn_v": "Q3_K", "attn_output": "Q3_K", "ffn_down_exps": "Q3_K",
                 "ffn_down_shexp": "Q4_0"},
        "q3_k_l": {"output": "Q6_K", "attn_v": "Q5_K", "attn_output": "Q5_K", "ffn_down_exps": "Q5_K",
                   "ffn_down_shexp": "Q5_1"},
        "q4_k_s": {"output": "Q6_K", "attn_v": "Q5_K", "ffn_down_shexp": "Q5_0"},
    }),
    # tied embeddings (token_embd takes the output's type), 4 query heads per kv head, 48-wide expert rows: not a
    # multiple of 32 either, so ffn_down_exps falls back to F16 in every K type
    "qwen3moe": (LAYERS | {"num_key_value_heads": 1, "moe_intermediate_size": 48, "tie_word_embeddings": True}, {
        "q4_k_m": {"token_embd": "Q6_K", "attn_v": MORE, "ffn_down_exps": "F16"},
        "q2_k": {"token_embd": "Q6_K", "attn_v": "Q4_K", "attn_output": "Q3_K", "ffn_down_exps": "F16"},
        "q6_k": {"token_embd": "Q6_K", "ffn_down_exps": "F16"},
    }),
}


def planned_types(base: Path, kind: str) -> dict[str, str]:
    """The type the exporter plans for every tensor (headers only: no quantizer needed)."""
    from qlora_kit.export.gguf import arch, writer

    names = arch.TensorNames(arch.arch_of(json.loads((base / "config.json").read_text())))
    tensors, _ = writer.plan(tensor_index(base), names, kind, set())
    return {p.name: p.kind.upper() for p in tensors}


@pytest.mark.parametrize("name", list(CASES))
def test_k_quant_types_are_llama_cpps(name, tmp_path):
    overrides, table = CASES[name]
    base = build(name, tmp_path / "base", hidden=256, config=overrides)
    for kind, rules in table.items():
        assert_types(name, kind, planned_types(base, kind), rules, kind[:2].upper() + "_K")


def assert_types(name: str, kind: str, got: dict[str, str], rules: dict, default: str) -> None:
    """Every planned type is the table's: `rules` by the tensor's kind (blk.N.<kind>.weight, or output/token_embd),
    one type or one per layer; `default` (the file's base type, "{0}" in the rules) for the rest; F32 for what
    llama.cpp's quantizer leaves alone (names not ending in weight, norms, the routers)."""
    assert "output.weight" in got or "output" not in rules, (name, kind)
    for tensor, t in got.items():
        parts = tensor.split(".")
        key, layer = (parts[2], int(parts[1])) if parts[0] == "blk" else (parts[0], None)
        want = rules.get(key, default)
        want = want[layer] if isinstance(want, tuple) else want
        if parts[-1] != "weight" or key.endswith("_norm") or key in ("ffn_gate_inp", "ffn_gate_inp_shexp"):
            want = F32
        assert t == want.format(default), (name, kind, tensor, t, want)


def test_expert_lora_in_merged_and_adapter_gguf_is_peft_s(tmp_path):
    """Qwen2-MoE with LoRA on attention and every expert: the f32 merged GGUF's ffn_{gate,up,down}_exps are PEFT's
    merge (transformers' gate_up_proj rows [gate; up]); the adapter GGUF's stacked pairs are (E, r, in) / (E, out, r)
    and alpha / r · B_e @ A_e adds exactly what PEFT's merge added to each expert."""
    from transformers import AutoModelForCausalLM

    base = build("qwen2moe", tmp_path / "base")
    a = adapter("qwen2moe", tmp_path / "a", base, experts=True)
    ex.export(a, ex.Options("gguf", tmp_path / "m.gguf", gguf_type="f32", progress=False, merge_base="original"))
    ex.export(a, ex.Options("gguf-adapter", tmp_path / "l.gguf", gguf_type="f32", progress=False))
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    lora = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(tmp_path / "l.gguf").tensors}
    merged = dict(peft_merged(base, a).named_parameters())
    orig = dict(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).named_parameters())
    i = 32  # moe_intermediate_size
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        for kind, peft_w, base_w in (("gate", merged[p + "gate_up_proj"][:, :i], orig[p + "gate_up_proj"][:, :i]),
                                     ("up", merged[p + "gate_up_proj"][:, i:], orig[p + "gate_up_proj"][:, i:]),
                                     ("down", merged[p + "down_proj"], orig[p + "down_proj"])):
            name = f"blk.{layer}.ffn_{kind}_exps.weight"
            assert torch.allclose(stored[name], peft_w, atol=1e-5), name
            A, B = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
            assert A.shape == (4, 4, base_w.shape[2]) and B.shape == (4, base_w.shape[1], 4)
            assert torch.allclose(base_w + 8.0 / 4 * B @ A, peft_w, atol=1e-5), name
            assert not torch.allclose(base_w, peft_w, atol=1e-2)  # the adapter changed every stack


def test_expert_adapter_that_does_not_fit_is_refused(tmp_path):
    """Per-expert names of the Hub layout (not what training adapts) and experts the base does not have."""
    from qlora_kit.adapters import peft_format

    base = build("mixtral", tmp_path / "base")
    a = peft_format.load_adapter(adapter("mixtral", tmp_path / "a", base))
    w1 = "model.layers.0.block_sparse_moe.experts.1.w1"
    extra = {f"{w1}.lora_A.weight": torch.zeros(4, 64), f"{w1}.lora_B.weight": torch.zeros(128, 4)}
    peft_format.save_adapter(tmp_path / "b", {**a.tensors, **extra}, r=4, alpha=8.0, dropout=0.0, rslora=False,
                             base_model=str(base))
    with pytest.raises(ExportError, match="does not fit"):
        ex.export(tmp_path / "b", ex.Options("gguf-adapter", tmp_path / "l.gguf", gguf_type="f32", progress=False))
    m = "model.layers.0.mlp.experts.{}.down_proj"
    extra = {f"{m.format(e)}.lora_{ab}.weight": torch.zeros(*s) for e in range(5) for ab, s in (("A", (4, 128)),
                                                                                                 ("B", (64, 4)))}
    peft_format.save_adapter(tmp_path / "c", {**a.tensors, **extra}, r=4, alpha=8.0, dropout=0.0, rslora=False,
                             base_model=str(base))
    for fmt in ("gguf", "gguf-adapter"):
        with pytest.raises(ExportError, match="does not fit"):  # expert 4 of a 4-expert base
            ex.export(tmp_path / "c", ex.Options(fmt, tmp_path / "l.gguf", gguf_type="f32", progress=False))
    assert not (tmp_path / "l.gguf").exists()


def test_expert_adapters_of_an_unverified_family_are_refused_by_name():
    """Expert LoRA is written only for the families whose layout is verified (every MoE family GGUF writes:
    tests/test_gguf_bigmoe.py, tests/test_moe_train.py); another family's expert adapters are refused by name and its
    attention-only adapters are not affected."""
    from qlora_kit.export.gguf import experts

    for hf in ("MixtralForCausalLM", "GptOssForCausalLM", "DeepseekV3ForCausalLM"):
        experts.check_family(hf, ["model.layers.1.mlp.experts.3.gate_up_proj"])
    with pytest.raises(ExportError, match="FutureMoeForCausalLM"):
        experts.check_family("FutureMoeForCausalLM", ["model.layers.0.mlp.experts.3.down_proj"])
    experts.check_family("FutureMoeForCausalLM", ["model.layers.0.self_attn.q_proj"])


@pytest.mark.parametrize("name", ["mixtral", "qwen2moe", "gptoss", "deepseek3"])
def test_routers_stay_f32_in_every_type(name, tmp_path):
    """The routers ffn_gate_inp (and Qwen2-MoE's shared-expert gate ffn_gate_inp_shexp) are planned F32 in every
    file type, as llama.cpp's converter keeps them; a merged q8_0 file holds the checkpoint's router values exactly."""
    from qlora_kit.export.gguf import arch, writer

    base = build(name, tmp_path / "base")
    names = arch.TensorNames(arch.arch_of(json.loads((base / "config.json").read_text())))
    routers = {p.name: p.info.name for p in writer.plan(tensor_index(base), names, "f32", set())[0]
               if ".ffn_gate_inp" in p.name}
    assert len(routers) >= 1 + (name == "qwen2moe"), routers
    for kind in ("q8_0", "q4_0", "q5_1", "f16", "bf16"):
        got = planned_types(base, kind)
        assert {got[r] for r in routers} == {F32}, (kind, {r: got[r] for r in routers})
        assert any(t == kind.upper() for t in got.values()), kind  # the other weights do take the type
    a = adapter(name, tmp_path / "a", base)  # the model's default targets: the routers are not among them
    ex.export(a, ex.Options("gguf", tmp_path / "m.gguf", gguf_type="q8_0", progress=False, merge_base="original"))
    from safetensors.torch import load_file

    hf = load_file(base / "model.safetensors")
    for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors:
        if t.name in routers:
            assert t.tensor_type.name == F32
            assert torch.equal(torch.from_numpy(t.data.copy()), hf[routers[t.name]].float()), t.name
