"""Mixture-of-experts QLoRA per architecture: train a few steps with nf4 experts and LoRA on every expert
(all-linear) -> `eval` equals transformers' loss with the same dequantized weights and PEFT loading our adapter
(target_parameters on the fused expert tensors) -> the merged export equals the run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FACTS, tiny_recipe, write_jsonl
from moe_models import MOE, make_moe_model, reference
from qlora_kit.config import DataConfig
from qlora_kit.data import pipeline as data
from qlora_kit.infer import evaluation
from qlora_kit.quant.bnb import QuantSpec, roundtrip

# different lengths: a short answer, a long one, and everything between
RECORDS = FACTS + [{"instruction": f"Say it {i} times.", "input": "", "output": "Tamsk is far. " * (i % 5 + 1)}
                   for i in range(10)]
SPEC = QuantSpec("nf4", 64, True, torch.float32)
# PEFT 0.21 loads a DeepSeek-V2/V3 adapter through its transformers-v4 shim, which reads target_modules
# gate_proj/up_proj/down_proj as the old per-expert names and moves them onto the routed experts (doubling their
# rank): an adapter on the shared experts' or the dense layer's MLP cannot load there as trained. So these runs
# adapt attention and the routed experts only (all-linear elsewhere).
TARGETS = {a: r".*\.(self_attn\.\w+|experts\.\d+\.(gate_up_proj|down_proj))" for a in ("deepseek_v2", "deepseek_v3")}


def _reference_loss(model, examples) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one example at a time: no padding involved
            logits = model(torch.tensor([ex.input_ids])).logits[0].float()
            labels = torch.tensor(ex.labels)
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            n += int((labels[1:] != -100).sum())
    return total / n


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """arch -> (model folder, run folder, data file): one short run per architecture, made on first use."""
    from qlora_kit.train import loop as train

    root = tmp_path_factory.mktemp("moe-train")
    path = write_jsonl(root / "d.jsonl", RECORDS)
    cache = {}

    def get(arch):
        if arch not in cache:
            folder = make_moe_model(root / arch, arch)
            recipe = tiny_recipe(folder, path, model={"dtype": "fp32"}, quant={"compute_dtype": "fp32"},
                                 data={"val_fraction": 0.25}, train={"steps": 3, "batch_size": 3, "lr": 3e-2},
                                 lora={"targets": TARGETS.get(arch, "all-linear")})
            train.run(recipe, root / f"run-{arch}", progress=False)
            cache[arch] = (folder, root / f"run-{arch}", path)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", MOE)
def test_eval_equals_transformers_with_peft_adapter(trained, arch):
    from peft import PeftModel
    from transformers import AutoTokenizer

    folder, run, path = trained(arch)
    res = evaluation.run(evaluation.Request(str(run), str(path), format="alpaca", max_length=64, batch_size=4))
    tok = AutoTokenizer.from_pretrained(folder)
    examples = data.build(DataConfig(path=str(path), format="alpaca", max_length=64), tok, 0).train
    assert len({len(ex.input_ids) for ex in examples}) > 3  # lengths vary
    ref = reference(folder, roundtrip=lambda w: roundtrip(w, SPEC, torch.float32))
    base_loss = _reference_loss(ref, examples)
    peft_model = PeftModel.from_pretrained(ref, str(run / "adapter")).eval()
    want = _reference_loss(peft_model, examples)
    assert res.loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert abs(want - base_loss) > 1e-3  # the adapter (experts included) changes the model
    # the experts' adapters trained: PEFT's fused expert B matrices are not all zero
    experts_b = [v for k, v in peft_model.state_dict().items() if ".experts." in k and "lora_B" in k]
    assert experts_b and any(b.abs().sum() > 0 for b in experts_b)


@pytest.mark.parametrize("arch", MOE)
def test_merged_export_equals_run_and_loads_in_transformers(trained, arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.export import formats as export

    folder, run, path = trained(arch)
    export.export(str(run), export.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                  experts_implementation="eager")
    tok = AutoTokenizer.from_pretrained(folder)
    examples = data.build(DataConfig(path=str(path), format="alpaca", max_length=64), tok, 0).train
    res = evaluation.run(evaluation.Request(str(run), str(path), format="alpaca", max_length=64, batch_size=4))
    assert _reference_loss(merged, examples) == pytest.approx(res.loss, rel=1e-5)
    # merged per expert from dequant(quant(W_e)): not the original experts
    orig = reference(folder)
    name = next(n for n, p in merged.named_parameters() if n.endswith("experts.down_proj"))
    assert not torch.allclose(dict(orig.named_parameters())[name], dict(merged.named_parameters())[name])
