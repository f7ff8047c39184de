"""Pre-quantized bases (bitsandbytes-serialised checkpoints) load as the frozen base from their stored codes: the
same QuantLinear tensors, bit for bit, as quantizing the 16-bit original while loading, and the logits of
transformers' own bitsandbytes loader of the same folder; a run trains on them."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, tiny_recipe
from qlora_kit.adapters import peft_format
from qlora_kit.config import ModelConfig, QuantConfig
from qlora_kit.export import formats as ex
from qlora_kit.model.load import load_base
from qlora_kit.quant.bnb import QuantLinear

X = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])


def _prequantized(tmp, quant: str):
    """The tiny base written as transformers' bitsandbytes checkpoint: a zero adapter merged onto the original
    weights, then quantized (what a `*-bnb-4bit` folder holds)."""
    base = make_tiny_model(tmp / "base", intermediate=128)
    tensors = {}
    for i in range(2):
        for m, (o, n) in {"self_attn.q_proj": (64, 64)}.items():
            tensors[f"model.layers.{i}.{m}.lora_A.weight"] = torch.randn(4, n) * 0.1
            tensors[f"model.layers.{i}.{m}.lora_B.weight"] = torch.zeros(o, 4)
    adapter = peft_format.save_adapter(tmp / "zero", tensors, r=4, alpha=8.0, dropout=0.0, rslora=False,
                                       base_model=str(base))
    out = tmp / f"bnb-{quant}"
    ex.export(adapter, ex.Options("quantized", out, quant=quant, merge_base="original", progress=False))
    return base, out


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_stored_codes_are_the_quantized_base_bit_for_bit(tmp_path, quant):
    base, pre = _prequantized(tmp_path, quant)
    q = QuantConfig(type=quant, compute_dtype="fp32")
    ours, _, _ = load_base(ModelConfig(path=str(pre)), q)
    ref, _, _ = load_base(ModelConfig(path=str(base)), q)
    layers = {n: m for n, m in ref.named_modules() if isinstance(m, QuantLinear)}
    assert layers and {n for n, m in ours.named_modules() if isinstance(m, QuantLinear)} == set(layers)
    for name, m in layers.items():
        mine = ours.get_submodule(name)
        assert mine.spec == m.spec, name
        for k, t in m.quant_tensors().items():
            assert torch.equal(mine.quant_tensors()[k], t), (name, k)
    with torch.no_grad():
        assert torch.equal(ours(X).logits, ref(X).logits)


def test_logits_match_transformers_bitsandbytes_loader(tmp_path):
    from transformers import AutoModelForCausalLM

    _, pre = _prequantized(tmp_path, "nf4")
    hf = AutoModelForCausalLM.from_pretrained(pre, dtype=torch.bfloat16).eval()
    ours, _, _ = load_base(ModelConfig(path=str(pre)), QuantConfig(compute_dtype="bf16"))
    with torch.no_grad():
        a, b = ours(X).logits.float(), hf(X).logits.float()
    assert (a - b).norm() / b.norm() < 2e-2  # same codes; bf16 compute in two different kernels


def test_a_run_trains_on_a_prequantized_base_and_refuses_what_cannot_work(tmp_path, tiny_data):
    from qlora_kit.errors import ConfigError
    from qlora_kit.train import loop as train

    _, pre = _prequantized(tmp_path, "nf4")
    summary = train.run(tiny_recipe(pre, tiny_data, train={"steps": 2}), tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    with pytest.raises(ConfigError, match="whose 16-bit weights are gone"):
        load_base(ModelConfig(path=str(pre)), QuantConfig(type="none"))
