"""The analytic memory estimate: parameter counts against real transformers models, byte formulas against the real
quantized buffers, monotonicity, the GPU table, and the `qlora-kit estimate` command (exit 2 on bad input)."""

import json
from pathlib import Path
import os
import subprocess
import sys
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import transformers

from qlora_kit.estimate import analytic as me
from qlora_kit.cli.main import main

SMOL = me.BUILTIN_CONFIGS["smollm2-135m"]
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)


def _real_counts(model: torch.nn.Module) -> dict[str, int]:
    """numel by the categories count_params uses, from a real model's named parameters."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():  # tied parameters are listed once
        parts = name.split(".")
        key = parts[-2] if parts[-2].endswith("_proj") else ("norm" if name == "model.norm.weight" else parts[-2])
        key = f"{key}.{parts[-1]}" if parts[-2].endswith("_proj") else key
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


@pytest.mark.parametrize("cls,extra", [
    (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    (transformers.LlamaConfig, dict(head_dim=32, attention_bias=True, mlp_bias=True)),  # head_dim != hidden/heads
    (transformers.Qwen2Config, dict(tie_word_embeddings=False)),  # q/k/v biases, no o_proj bias
    (transformers.Qwen3Config, dict(head_dim=24)),  # q_norm, k_norm
])
@pytest.mark.parametrize("drop_head_dim", [False, True])
def test_count_params_equals_real_model(cls, extra, drop_head_dim):
    config = cls(**TINY, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    d = config.to_dict()
    if drop_head_dim:
        if "head_dim" in extra:
            pytest.skip("head_dim given on purpose")
        d.pop("head_dim", None)  # old config.json files: head_dim = hidden // heads
    s = me.count_params(d)
    real = _real_counts(model)
    assert s.total == sum(p.numel() for p in model.parameters())
    for lin in s.linears:
        assert real[f"{lin.name}.weight"] == s.layers * lin.numel
        assert real.get(f"{lin.name}.bias", 0) == (s.layers * lin.out_features if lin.bias else 0)
    assert s.other["embed_tokens"] == real["embed_tokens"]
    assert s.other.get("lm_head", 0) == real.get("lm_head", 0)
    assert s.other["layer_norms"] == real["input_layernorm"] + real["post_attention_layernorm"]
    assert s.other.get("qk_norms", 0) == real.get("q_norm", 0) + real.get("k_norm", 0)
    assert s.other["linear_biases"] == sum(v for k, v in real.items() if k.endswith(".bias"))
    assert s.tied == config.tie_word_embeddings


def test_smollm2_total_and_adapters():
    s = me.count_params(SMOL)
    assert s.total == 134_515_008
    assert s.tied and "lm_head" not in s.other
    dims = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
            "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    e = me.estimate(SMOL, me.EstimateConfig(rank=16))
    assert e.adapter_params == 30 * sum(16 * (i + o) for i, o in dims.values())
    # adapter gradients are not allocated at this configuration's peak (the loss head); `sizes` has their size
    assert e.components["adapters"] == 2 * e.adapter_params
    assert e.sizes["adapter_grads"] == 4 * e.adapter_params  # optim.py: one flat fp32 gradient
    assert e.components["optimizer_state"] == 12 * e.adapter_params  # fp32 master + exp_avg + exp_avg_sq
    qv = me.estimate(SMOL, me.EstimateConfig(rank=16, targets=("q_proj", "v_proj")))
    assert qv.adapter_params == 30 * 16 * (576 + 576 + 576 + 192)


def test_adapter_count_equals_real_injection():
    from qlora_kit.adapters.lora import LoraSpec, inject

    config = transformers.LlamaConfig(**TINY)
    model = transformers.AutoModelForCausalLM.from_config(config)
    inject(model, ["q_proj", "v_proj", "down_proj"], LoraSpec(r=4, alpha=8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    e = me.estimate(config.to_dict(), me.EstimateConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")))
    assert e.adapter_params == trainable


def test_dora_ia3_params_equal_real_injection():
    """DoRA's magnitudes and IA3's vectors: counted as trained, their fp32 bytes (and DoRA's ||W||^2 buffer) in
    `adapters`, and 4 bytes each in the flat gradient and master."""
    from qlora_kit.adapters.dora import DoRALinear
    from qlora_kit.adapters.lora import LoraSpec, inject
    from qlora_kit.adapters.methods import inject_ia3

    config = transformers.LlamaConfig(**TINY)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    inject(model, ["q_proj", "v_proj"], LoraSpec(r=4, alpha=8), layer=DoRALinear)
    inject_ia3(model, ["k_proj", "v_proj"], ["down_proj"])
    trained = [p for p in model.parameters() if p.requires_grad]
    nbytes = sum(p.numel() * p.element_size() for p in trained)
    nbytes += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(".w2"))
    cfg = me.EstimateConfig(rank=4, targets=("q_proj", "v_proj"), dora=True, ia3_outputs=("k_proj", "v_proj"),
                            ia3_inputs=("down_proj",))
    e = me.estimate(config.to_dict(), cfg)
    assert e.adapter_params == sum(p.numel() for p in trained)
    assert e.components["adapters"] == nbytes
    plain = me.estimate(config.to_dict(), me.EstimateConfig(rank=4, targets=("q_proj", "v_proj")))
    extra = e.adapter_params - plain.adapter_params
    assert e.sizes["adapter_grads"] - plain.sizes["adapter_grads"] == 4 * extra
    with pytest.raises(me.ConfigError, match="both outputs and inputs"):
        me.EstimateConfig(ia3_outputs=("v_proj",), ia3_inputs=("v_proj",))
    with pytest.raises(me.ConfigError, match="did you mean k_proj"):
        me.estimate(config.to_dict(), me.EstimateConfig(ia3_outputs=("k_prj",)))


@pytest.mark.parametrize("shape", [(3, 7), (256, 688), (576, 1536), (4096, 4096)])
@pytest.mark.parametrize("quant,double_quant,blocksize", [
    ("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 128), ("int8", False, 64)])
def test_quantized_bytes_equal_real_buffers(shape, quant, double_quant, blocksize):
    from qlora_kit.quant.bnb import QuantSpec, quantize

    buffers = quantize(torch.randn(*shape, dtype=torch.bfloat16), QuantSpec(quant, blocksize, double_quant))
    nbytes = {k: t.numel() * t.element_size() for k, t in buffers.items()}
    lin = me.LinearShape("w", shape[1], shape[0], False)
    cfg = me.EstimateConfig(quant=quant, blocksize=blocksize, double_quant=double_quant)
    assert me._quant_bytes(lin, cfg) == (nbytes["qweight"], sum(nbytes.values()) - nbytes["qweight"])


def test_bits_per_weight_nf4():
    big = {**SMOL, "hidden_size": 4096, "intermediate_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 32, "head_dim": 128}
    dq = me.estimate(big, me.EstimateConfig()).bits_per_weight
    assert dq == pytest.approx(4.127, abs=0.001)  # QLoRA paper: 4 + 8/64 + 32/(64*256)
    assert me.estimate(big, me.EstimateConfig(double_quant=False)).bits_per_weight == pytest.approx(4.5, abs=0.001)


def test_monotone_and_consistent():
    cfg = me.EstimateConfig(batch=2, seq=512)
    base = me.estimate(SMOL, cfg)
    assert base.total == sum(base.components.values())
    assert list(base.components) == list(me.COMPONENTS)
    assert me.estimate(SMOL, replace(cfg, seq=1024)).components["activations"] > base.components["activations"]
    assert me.estimate(SMOL, replace(cfg, batch=4)).components["activations"] > base.components["activations"]
    assert me.estimate(SMOL, replace(cfg, checkpointing=False)).components["activations"] > \
        base.components["activations"]
    assert me.estimate(SMOL, replace(cfg, rank=64)).components["adapters"] > base.components["adapters"]
    weights = [me.estimate(SMOL, replace(cfg, quant=q)).components["quantized_weights"]
               for q in ("nf4", "int8", "none")]
    assert weights == sorted(weights) and weights[2] == 2 * me.count_params(SMOL).linear_params
    eight = me.estimate(SMOL, replace(cfg, optimizer="adamw8bit"))
    assert eight.components["optimizer_state"] < base.components["optimizer_state"] / 1.9  # 8-bit moments, fp32 master
    assert eight.pageable == 0 and me.estimate(SMOL, replace(cfg, optimizer="paged_adamw8bit")).pageable > 0
    assert me.estimate(SMOL, replace(cfg, device="cpu")).components["cuda_context"] == 0
    long = replace(cfg, seq=8192)
    assert me.estimate(SMOL, long).unchunked_loss > me.estimate(SMOL, long).components["logits_and_loss"]


def test_max_seq_table_bisection():
    config, cfg = me.BUILTIN_CONFIGS["llama-3.1-8b"], me.EstimateConfig(batch=1)
    rows = me.max_seq_table(config, cfg)
    assert [r["gpu_gib"] for r in rows] == list(me.GPU_SIZES_GIB)
    seqs = [r["max_seq"] for r in rows]
    assert all(seqs) and seqs == sorted(seqs)
    for r in rows:
        assert me.estimate(config, replace(cfg, seq=r["max_seq"])).total <= r["gpu_bytes"]
        if not r["capped"]:  # capped: max_position_embeddings fits, there is no longer sequence to try
            assert me.estimate(config, replace(cfg, seq=r["max_seq"] + 1)).total > r["gpu_bytes"]
    assert all(r["capped"] for r in me.max_seq_table(SMOL, cfg))
    unquantized = me.max_seq_table(config, replace(cfg, quant="none"), gpus_gib=(8,))
    assert unquantized[0]["max_seq"] is None  # 16 GB of bf16 weights


def _run(capsys, *args):
    rc = main(["estimate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_dora_ia3_flags(capsys):
    """--dora / --ia3 reach the estimate; the grid keys dora/ia3 build a recipe whose estimate config has them."""
    from qlora_kit.measure.grid import parse_specs
    from qlora_kit.measure.breakdown import MeasureConfig, estimate_config, recipe_for

    rc, out, _ = _run(capsys, "--model", "smollm2-135m", "--dora", "--ia3", "--json")
    d = json.loads(out)
    assert rc == 0 and d["config"]["dora"] and d["config"]["ia3_outputs"] == ["k_proj", "v_proj"]
    assert d["config"]["ia3_inputs"] == ["down_proj"]
    plain = me.estimate(SMOL, me.EstimateConfig())
    assert d["adapter_params"] == plain.adapter_params + 30 * (5184 + 2 * 192 + 1536)  # magnitudes + IA3 vectors
    rc, out, _ = _run(capsys, "--model", "smollm2-135m", "--ia3-inputs", "down_proj", "--json")
    assert json.loads(out)["config"]["ia3_outputs"] == []
    assert parse_specs(["dora=0,1 ia3=1"]) == {"dora": [0, 1], "ia3": [1]}
    cfg = estimate_config(recipe_for(MeasureConfig(dora=True, ia3=True), Path("unused.jsonl")), "cpu")
    assert cfg.dora and cfg.ia3_outputs == ("k_proj", "v_proj") and cfg.ia3_inputs == ("down_proj",)


def test_cli_json(capsys):
    rc, out, _ = _run(capsys, "--model", "smollm2-135m", "--rank", "16", "--seq", "256", "--batch", "4", "--json",
                      "--gpu-mem", "24GiB")
    assert rc == 0
    d = json.loads(out)
    assert set(me.COMPONENTS) == set(d["components"])
    assert d["total"] == sum(d["components"].values())
    assert d["params"]["base_total"] == 134_515_008
    assert d["fits"] is True and d["gpu_mem"] == 24 << 30
    assert [r["gpu_gib"] for r in d["max_seq"]] == list(me.GPU_SIZES_GIB)
    assert d["config"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_cli_text_and_fit(capsys):
    rc, out, _ = _run(capsys, "--model", "llama-3.1-8b", "--seq", "2048", "--batch", "1", "--gpu-mem", "24GiB")
    assert rc == 0 and "fits in 24GiB: yes" in out and "longest sequence" in out and "total" in out
    rc, out, _ = _run(capsys, "--model", "llama-3.1-8b", "--quant", "none", "--gpu-mem", "16GiB")
    assert rc == 0 and "fits in 16GiB: no (needs" in out


def test_cli_model_folder(capsys, tmp_path):
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path)
    rc, out, _ = _run(capsys, "--model", str(tmp_path), "--json", "--targets", "q_proj,v_proj")
    assert rc == 0 and json.loads(out)["config"]["targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("args,msg", [
    (["--model", "no/such/folder"], "no such folder"),
    (["--model", "smollm2-135"], "did you mean smollm2-135m"),
    (["--model", "smollm2-135m", "--gpu-mem", "24 potatoes"], "is not a size"),
    (["--model", "smollm2-135m", "--gpu-mem", "24"], "has no unit: write 24GiB"),
    (["--model", "smollm2-135m", "--rank", "0"], "rank must be a positive"),
    (["--model", "smollm2-135m", "--seq", "-5"], "seq must be a positive"),
    (["--model", "smollm2-135m", "--batch", "0"], "batch must be a positive"),
    (["--model", "smollm2-135m", "--blocksize", "100"], "blocksize must be one of"),
    (["--model", "smollm2-135m", "--targets", "q_prj"], "did you mean q_proj"),
    (["--model", "smollm2-135m", "--quant", "nf3"], "nf3"),
])
def test_cli_bad_input_exit_2(capsys, args, msg):
    rc, out, err = _run(capsys, *args)
    assert rc == 2 and msg in err and "Traceback" not in out + err


def test_cli_bad_folders_exit_2(capsys, tmp_path):
    rc, _, err = _run(capsys, "--model", str(tmp_path))
    assert rc == 2 and "no config.json" in err
    (tmp_path / "config.json").write_text("{not json")
    rc, _, err = _run(capsys, "--model", str(tmp_path))
    assert rc == 2 and "not readable JSON" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    rc, _, err = _run(capsys, "--model", str(tmp_path))
    assert rc == 2 and "lacks n_layer, n_head, vocab_size" in err
    (tmp_path / "config.json").write_text(json.dumps({**SMOL, "model_type": "mamba"}))
    rc, _, err = _run(capsys, "--model", str(tmp_path))
    assert rc == 2 and "'mamba' is not a layout" in err


def test_script_exit_2_without_traceback():
    p = subprocess.run([sys.executable, "-m", "qlora_kit.cli.main", "estimate", "--model", "smollm2-135m",
                        "--gpu-mem", "24 potatoes"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") <= 2


IA3 = (("k_proj", "v_proj"), ("down_proj",))  # the recipe's default ia3 section: outputs, inputs


@pytest.mark.parametrize("cls,targets,dropout,replay,mlp_chunk,dora,ia3", [
    (transformers.LlamaConfig, "all-linear", 0.0, True, 0, False, None),
    (transformers.LlamaConfig, "all-linear", 0.1, True, 0, False, None),
    (transformers.LlamaConfig, "all-linear", 0.1, False, 0, False, None),
    (transformers.LlamaConfig, "all-linear", 0.1, True, 16, False, None),
    (transformers.LlamaConfig, ("q_proj", "v_proj", "up_proj"), 0.0, True, 0, False, None),
    (transformers.Qwen3Config, ("k_proj", "o_proj", "down_proj"), 0.1, False, 0, False, None),
    (transformers.Qwen3Config, ("k_proj", "o_proj", "down_proj"), 0.1, True, 24, False, None),
    (transformers.LlamaConfig, "all-linear", 0.0, True, 0, True, None),  # DoRA everywhere
    (transformers.LlamaConfig, (), 0.0, True, 0, False, IA3),  # IA3 alone
    (transformers.LlamaConfig, "all-linear", 0.0, True, 0, False, IA3),  # LoRA under IA3 on v_proj, down_proj
    (transformers.LlamaConfig, ("q_proj", "v_proj", "o_proj", "down_proj"), 0.1, False, 0, True, IA3),
    (transformers.LlamaConfig, ("gate_proj",), 0.0, True, 0, True, (("o_proj", "up_proj"), ("q_proj", "gate_proj"))),
])
def test_layer_activations_equal_saved_tensors(cls, targets, dropout, replay, mlp_chunk, dora, ia3, monkeypatch):
    """What autograd really saves in one quantized + LoRA decoder layer (bf16, CPU, lean norms) equals the per-layer
    formula: with LoRA dropout as plain nn.Dropout or dropout_replay's, with and without a tiled MLP; with DoRA,
    IA3 (input and output scaling), and both over the same modules."""
    from qlora_kit.adapters.dora import DoRALinear
    from qlora_kit.adapters.methods import inject_ia3
    from qlora_kit.adapters.lora import LoraSpec, LoRALinear, inject
    from qlora_kit.quant.bnb import QuantLinear, QuantSpec
    from qlora_kit.lowmem.lean_norm import make_lean
    from qlora_kit.lowmem.tiled_mlp import tile_mlps

    monkeypatch.setattr(LoRALinear, "replay_dropout", replay)

    torch.manual_seed(0)
    config = cls(**{**TINY, "hidden_size": 128, "intermediate_size": 192}, attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                setattr(parent, name, QuantLinear.from_weight(child.weight.data, QuantSpec("nf4", 64, True)))
    if targets:
        inject(model, targets, LoraSpec(r=8, alpha=16, dropout=dropout), layer=DoRALinear if dora else LoRALinear)
    if ia3:
        inject_ia3(model, list(ia3[0]), list(ia3[1]))
    for name, p in model.named_parameters():  # frozen base, as training has it (else the norms save for .weight)
        p.requires_grad_("lora_" in name or "ia3_l" in name)
    tile_mlps(model, mlp_chunk)
    norms = 4 if cls is transformers.Qwen3Config else 2  # + q_norm, k_norm
    assert make_lean(model) == norms * config.num_hidden_layers + 1  # as prepare() builds a training model
    model.train()
    B, S = 2, 64
    x = model.model.embed_tokens(torch.randint(0, 128, (B, S))).detach().requires_grad_(True)
    pos = torch.arange(S)[None]
    pe = model.model.rotary_emb(x, pos)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, position_embeddings=pe, attention_mask=None, position_ids=pos)
    not_activations = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *pe]}
    measured = sum(n for ptr, n in saved.items() if ptr not in not_activations)

    cfg = me.EstimateConfig(rank=8, batch=B, seq=S, targets=targets, lora_dropout=dropout, device="cpu",
                            replay_dropout=replay, mlp_chunk=mlp_chunk, dora=dora,
                            ia3_outputs=ia3[0] if ia3 else (), ia3_inputs=ia3[1] if ia3 else ())
    s = me.count_params(config.to_dict())
    assert measured == sum(me.layer_activations(s, cfg, me.resolve_targets(s, targets)).values())


def test_cli_says_which_of_the_models_own_dropout_is_counted(capsys, tmp_path):
    """GPT-2's config keeps dropout 0.1 on attention, residuals and embeddings, on while training; its estimate
    counts them (masks, the CPU's math-path attention), so the CLI says so, in text and JSON; a family whose
    dropout the estimate does not model (Llama's attention_dropout) is named as not counted; a config whose
    dropouts are 0 gets no line."""
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 320, "n_positions": 512,
            "attn_pdrop": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.0, "summary_first_dropout": 0.1}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    rc, out, _ = _run(capsys, "--model", str(tmp_path))
    assert rc == 0 and "own dropout is on while training (attn_pdrop 0.1, resid_pdrop 0.1): counted above" in out
    assert "not counted" not in out, out
    rc, out, _ = _run(capsys, "--model", str(tmp_path), "--json")
    d = json.loads(out)
    assert d["counted_model_dropout"] == {"attn_pdrop": 0.1, "resid_pdrop": 0.1}
    assert d["uncounted_model_dropout"] == {}
    llama = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 320, "attention_dropout": 0.1}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    rc, out, _ = _run(capsys, "--model", str(tmp_path))
    assert rc == 0 and "(attention_dropout 0.1): its masks are not counted above" in out, out
    rc, out, _ = _run(capsys, "--model", "smollm2-135m")  # attention_dropout 0.0
    assert rc == 0 and "own dropout" not in out
