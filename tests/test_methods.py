"""DoRA, IA3, LoRA+ and LoRA+IA3 in one run: PEFT parity both ways, untrained = base, exact merges (quantized base
included), the optimizer's groups. PEFT 0.21 is the independent reference; float64 math for the DoRA norm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_recipe
from qlora_kit.export import formats as ex
from qlora_kit.infer import generate
from qlora_kit.train import loop as train
from qlora_kit.data import pipeline as data
from qlora_kit.adapters import dora, ia3, methods, peft_format
from qlora_kit.quant import bnb as quant
from qlora_kit.config import recipe_from_dict
from qlora_kit.errors import ConfigError

IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3, 8, 120, 64, 2]])
PLAIN = {"type": "none", "compute_dtype": "fp32"}  # a bf16 base, adapters in fp32: PEFT runs it in fp32 too
NF4 = {"compute_dtype": "fp32"}  # QLoRA's nf4 / double quant / blocksize 64, fp32 compute for tight comparisons
ATTN = ["q_proj", "v_proj"]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ours(path: Path, base: Path | None = None):
    """The model `generate` builds from a run or adapter folder, in fp32 (bf16 values are exact in fp32)."""
    m = generate.load(str(path), base=str(base) if base else None, quant=None if base is None else
                      recipe_from_dict({"quant": PLAIN}).quant).model
    return m.float().eval()


def run(tiny_model, tiny_data, folder: Path, q=PLAIN, steps=3, **sections) -> Path:
    train.run(tiny_recipe(tiny_model, tiny_data, quant=q, train={"steps": steps, "save_every": 0}, **sections),
              folder, progress=False)
    return folder


def peft_load(base: Path, *folders: Path):
    """PEFT applies the folders in the documented order: each merged before the next is loaded."""
    from peft import PeftModel

    model = hf_model(base)
    for k, f in enumerate(folders):
        model = PeftModel.from_pretrained(model, f).eval()
        if k < len(folders) - 1:
            model = model.merge_and_unload()
    return model


# ---- DoRA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["nf4", "none"])
def test_dora_norm_is_the_float64_row_norm_and_constant_in_backward(qtype):
    torch.manual_seed(0)
    W = torch.randn(48, 128) * 0.3
    base = nn.Linear(128, 48, bias=True) if qtype == "none" else quant.QuantLinear.from_weight(
        W, quant.QuantSpec(qtype, compute_dtype=torch.float32), bias=torch.randn(48))
    if qtype == "none":
        base.weight.data.copy_(W)
    from qlora_kit.adapters.lora import LoraSpec

    layer = dora.DoRALinear(base, LoraSpec(4, 8.0, dtype=torch.float32))
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.2)
    Wd = dora.base_weight(base).double()  # dequant(Q): what the forward multiplies by
    want = torch.linalg.vector_norm(Wd + 2.0 * layer.lora_B.weight.double() @ layer.lora_A.weight.double(), dim=1)
    assert torch.allclose(layer.weight_norm().double(), want, rtol=1e-5)
    assert not layer.weight_norm().requires_grad

    # the forward is m ⊙ (W + sBA) x / ||W + sBA|| + b; the gradient of A treats the norm as a constant
    x = torch.randn(5, 128)
    layer(x).square().sum().backward()
    A = layer.lora_A.weight.detach().double().requires_grad_(True)
    Bd, m = layer.lora_B.weight.detach().double(), layer.lora_magnitude_vector.detach().double()
    V = Wd + 2.0 * Bd @ A
    bias = base.bias.detach().double()
    grads = {}
    for detach in (True, False):
        n = torch.linalg.vector_norm(V, dim=1)
        y = x.double() @ (V * (m / (n.detach() if detach else n))[:, None]).T + bias
        grads[detach] = torch.autograd.grad(y.square().sum(), A, retain_graph=True)[0]
    assert rel(layer.lora_A.weight.grad, grads[True]) < 1e-5
    assert rel(grads[False], grads[True]) > 1e-3  # the choice is visible: a norm in the graph gives other gradients


def test_untrained_dora_and_ia3_leave_the_quantized_model_unchanged(tiny_model, tiny_data):
    from qlora_kit.model.load import load_base

    recipe = tiny_recipe(tiny_model, tiny_data, quant=NF4, lora={"dora": True, "targets": "all-linear"}, ia3={})
    model, _, _ = load_base(recipe.model, recipe.quant)
    before = logits(model.eval())
    adapted = methods.inject(model, recipe.lora, recipe.ia3, torch.float32)
    assert set(adapted) == {"dora", "ia3"} and len(adapted["ia3"]) == 6
    assert torch.equal(logits(model.eval()), before)  # bit for bit: g = m / ||W|| = 1 and l = 1 exactly


def test_dora_run_loads_in_peft_with_the_same_logits(tiny_model, tiny_data, tmp_path):
    r = run(tiny_model, tiny_data, tmp_path / "run", lora={"dora": True})
    cfg = json.loads((r / "adapter" / peft_format.CONFIG_NAME).read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    a = peft_format.load_adapter(r / "adapter")
    m = a.modules()[0]
    assert a.magnitude(m).shape == (a.pair(m)[1].shape[0],)
    mine = ours(r)
    with methods.disabled(mine):
        assert rel(logits(mine), logits(hf_model(tiny_model))) < 1e-6  # disabled = the base
    assert rel(logits(mine), logits(hf_model(tiny_model))) > 1e-3  # the adapter learned something
    assert rel(logits(peft_load(tiny_model, r / "adapter")), logits(mine)) < 1e-5


def _peft_adapter(tiny_model: Path, folder: Path, config) -> torch.Tensor:
    """A PEFT-written adapter with every trainable tensor perturbed; returns PEFT's logits."""
    from peft import get_peft_model

    model = get_peft_model(hf_model(tiny_model), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder)
    return logits(model.eval())


def test_peft_written_dora_and_ia3_give_peft_logits_in_generate_and_export(tiny_model, tmp_path):
    from peft import IA3Config, LoraConfig

    cases = {"dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
             "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])}
    for name, config in cases.items():
        want = _peft_adapter(tiny_model, tmp_path / name, config)
        assert rel(want, logits(hf_model(tiny_model))) > 1e-3
        assert rel(logits(ours(tmp_path / name, base=tiny_model)), want) < 1e-5, name
        a = peft_format.load_stack(tmp_path / name)[0]
        assert a.modules() and all(a.has(m) for m in a.modules()), name  # the merge's per-module lookup
        assert not a.has("model.layers.0.mlp.up_proj") and not a.has(a.modules()[0] + ".lora_A"), name
        out = tmp_path / f"{name}-merged"
        ex.export(tmp_path / name, ex.Options("merged", out, base=str(tiny_model), merge_base="original",
                                              dtype="fp32", progress=False))
        assert rel(logits(hf_model(out)), want) < 1e-5, name


# ---- IA3 -------------------------------------------------------------------------------------------------------


def test_ia3_alone_loads_in_peft_and_counts_its_parameters(tiny_model, tiny_data, tmp_path):
    r = run(tiny_model, tiny_data, tmp_path / "run", lora={"targets": []}, ia3={})
    cfg = json.loads((r / "adapter" / peft_format.CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    assert sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    summary = json.loads((r / "summary.json").read_text())
    # k_proj/v_proj: out = 32 (2 kv heads x 16), down_proj input: 176; 2 layers
    assert summary["trainable_by_method"] == {"ia3": 2 * (32 + 32 + 176)} == {"ia3": summary["trainable_params"]}
    mine = ours(r)
    assert rel(logits(mine), logits(hf_model(tiny_model))) > 1e-4
    assert rel(logits(peft_load(tiny_model, r / "adapter")), logits(mine)) < 1e-5


def test_ia3_section_validation():
    assert recipe_from_dict({"ia3": {}}).ia3.outputs == ["k_proj", "v_proj"]
    assert recipe_from_dict({}).ia3 is None
    with pytest.raises(ConfigError, match="nothing would train"):
        recipe_from_dict({"lora": {"targets": []}})
    with pytest.raises(ConfigError, match="Did you mean 'outputs'"):
        recipe_from_dict({"ia3": {"output": ["k_proj"]}})


# ---- LoRA+ -----------------------------------------------------------------------------------------------------


def test_lora_plus_puts_b_in_its_own_group_and_one_step_scales_b_by_the_ratio(tiny_model, tiny_data):
    def one_step(ratio):
        p = train.prepare(tiny_recipe(tiny_model, tiny_data, quant=NF4, lora={"plus_ratio": ratio},
                                      train={"weight_decay": 0.0}))
        batch = data.collate(p.dataset.train[:2], data.pad_token_id(p.tokenizer))
        A0 = {k: v.detach().clone() for k, v in methods.state_dict(p.model).items() if "lora_A" in k}
        train.train_step(p, [batch], 1e-3, 0.0)
        return p, A0, methods.state_dict(p.model)

    p16, A0, s16 = one_step(16.0)
    opt = p16.optimizer
    groups = sorted((f.group.lr_ratio, g["lr"], len(f.params)) for f, g in zip(opt.flats, opt.inner.param_groups))
    n_mod = len(p16.targets)
    assert groups == [(1.0, 1e-3, n_mod), (16.0, 16e-3, n_mod)]  # A at lr, B at 16 x lr
    p1, _, s1 = one_step(1.0)
    assert len(p1.optimizer.inner.param_groups) == 1  # ratio 1: exactly plain LoRA's single group
    for k in s1:
        if "lora_B" in k:  # from B = 0, Adam's first step is lr · sign-like(g): B moves ratio x as far
            assert torch.allclose(s16[k], 16 * s1[k], rtol=1e-4, atol=1e-7), k
        else:  # A's gradient is 0 while B = 0: A stays put under both
            assert torch.equal(s16[k], A0[k]) and torch.equal(s1[k], A0[k])


# ---- several methods in one run ----------------------------------------------------------------------------------


def test_lora_plus_ia3_run_folders_reproduce_the_run_in_peft(tiny_model, tiny_data, tmp_path):
    r = run(tiny_model, tiny_data, tmp_path / "run", lora={"targets": ATTN + ["k_proj"]}, ia3={})
    stack = peft_format.load_stack(r / "adapter")
    assert [a.method for a in stack] == ["lora", "ia3"]
    assert (r / "adapter" / "ia3" / peft_format.WEIGHTS_NAME).is_file()
    counts = json.loads((r / "summary.json").read_text())["trainable_by_method"]
    assert counts == {"lora": 2 * 4 * ((64 + 64) + (64 + 32) * 2), "ia3": 2 * (32 + 32 + 176)}
    mine = ours(r)
    assert rel(logits(mine), logits(hf_model(tiny_model))) > 1e-3
    # documented order: the LoRA folder, merged, then ia3/ over it (k_proj has both)
    assert rel(logits(peft_load(tiny_model, r / "adapter", r / "adapter" / "ia3")), logits(mine)) < 1e-5
    out = tmp_path / "exported"
    ex.export(r, ex.Options("adapter", out, progress=False))
    assert [a.method for a in peft_format.load_stack(out)] == ["lora", "ia3"]
    assert rel(logits(peft_load(tiny_model, out, out / "ia3")), logits(mine)) < 1e-5


@pytest.mark.parametrize("sections", [
    {"lora": {"dora": True}},
    {"lora": {"targets": []}, "ia3": {}},
    {"lora": {"targets": ATTN, "dora": True}, "ia3": {"outputs": ["k_proj", "v_proj"], "inputs": ["down_proj"]}},
], ids=["dora", "ia3", "dora+ia3"])
def test_merged_export_equals_the_quantized_training_model(tiny_model, tiny_data, tmp_path, sections):
    r = run(tiny_model, tiny_data, tmp_path / "run", q=NF4, steps=2, **sections)
    out = tmp_path / "merged"
    ex.export(r, ex.Options("merged", out, dtype="fp32", progress=False))  # into dequant(Q)
    mine = ours(r)  # the nf4 base + adapters, as training computed
    assert rel(logits(hf_model(out)), logits(mine)) < 2e-5
    assert rel(logits(mine), logits(hf_model(tiny_model))) > 1e-3


def test_ia3_over_a_module_with_bias_scales_the_bias_in_the_merge():
    l = torch.tensor([[2.0], [0.5]])
    a = peft_format.Adapter({"m.k.ia3_l": l}, 0, 0.0, False, ["k"], None, {"feedforward_modules": []}, kind="ia3")
    assert torch.equal(methods.bias_scale([a], "m.k"), torch.tensor([2.0, 0.5]))
    W = torch.ones(2, 3)
    assert torch.equal(methods.merge_rows(W, [a], "m.k", (0, 2), torch.float32), torch.tensor([[2.0] * 3, [0.5] * 3]))
    layer = ia3.IA3Linear(nn.Linear(3, 2), feedforward=False)
    with torch.no_grad():
        layer.ia3_l.copy_(l)
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base(x) * l[:, 0])  # y = l ⊙ (W x + b)


# ---- the other commands read every method ------------------------------------------------------------------------


def test_inspect_analyze_and_generate_read_a_dora_plus_ia3_run(tiny_model, tiny_data, tmp_path, capsys):
    from qlora_kit.analysis import analyze, inspect
    from qlora_kit.cli.main import main

    r = run(tiny_model, tiny_data, tmp_path / "run", q=NF4, steps=2, lora={"targets": ATTN, "dora": True}, ia3={})
    info = inspect.describe(str(r / "adapter"))
    assert info["method"] == "dora+ia3" and [p["method"] for p in info["methods"]] == ["dora", "ia3"]
    assert info["params"] == sum(json.loads((r / "summary.json").read_text())["trainable_by_method"].values())
    assert inspect.describe(str(r))["method"] == "dora+ia3"

    rep = analyze.analyze(r).to_dict()  # against the run's own nf4 base
    assert rep["method"] == "dora+ia3" and len(rep["modules"]) == 4 and len(rep["ia3"]) == 6
    mag = rep["modules"][0]["magnitude"]
    a = peft_format.load_adapter(r / "adapter")
    m0 = rep["modules"][0]["module"]
    W = quant.roundtrip(hf_model(tiny_model).get_submodule(m0).weight.detach().to(torch.bfloat16),
                        quant.QuantSpec("nf4", compute_dtype=torch.float32), torch.float32)
    want = (a.magnitude(m0).double() / torch.linalg.vector_norm(W.double(), dim=1) - 1).abs()
    assert mag["max_abs_rel_change"] == pytest.approx(float(want.max()), rel=1e-6) and mag["max_abs_rel_change"] > 0
    down = next(x for x in rep["ia3"] if x["kind"] == "down_proj")
    assert down["scales"] == "input" and down["n"] == 176 and down["mean_abs_dev"] > 0

    loaded = generate.load(str(r))
    # dense fp32 weights (fp16 storage would round the merged values), DoRA folded with its magnitude, IA3 outside
    assert "merged" in generate.speed_up(loaded, dtype="fp32")
    assert rel(logits(loaded.model), logits(ours(r))) < 1e-5
    assert main(["generate", str(r), "--prompt", "What is the capital of Veloria 3?", "--max-new-tokens", "3",
                 "--compare-base"]) == 0
    assert "fine-tuned" in capsys.readouterr().out
    assert main(["analyze", str(r)]) == 0
    assert "ia3" in capsys.readouterr().out
