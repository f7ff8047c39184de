"""model.py: quantize-while-loading of tiny random Llamas saved in the test."""

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from qlora_kit.config import ModelConfig, QuantConfig
from qlora_kit.model.load import load_base
from qlora_kit.quant.bnb import QuantLinear, QuantSpec, roundtrip


def _reference(folder, spec: QuantSpec):
    """transformers' own bf16 model with every Linear but lm_head set to dequant(quant(W)): what ours must compute."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                m.weight.copy_(roundtrip(m.weight, spec, torch.bfloat16))
    return ref


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "none"])
def test_load_quantized_frozen_and_equal_to_reference(tiny_model, kind):
    model, tok, _ = load_base(ModelConfig(str(tiny_model)), QuantConfig(type=kind))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    assert isinstance(linears["lm_head"], nn.Linear)  # lm_head is never quantized
    others = [m for n, m in linears.items() if n != "lm_head"]
    assert all(isinstance(m, QuantLinear if kind != "none" else nn.Linear) for m in others)
    # frozen 16-bit weights stay 16-bit: no fp32 up-cast of embeddings, norms or lm_head
    quant_ids = {id(t) for m in others if isinstance(m, QuantLinear) for t in m.quant_tensors().values()}
    assert {p.dtype for p in model.parameters() if id(p) not in quant_ids} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([tok("The capital of Veloria is Tamsk.")["input_ids"]])
    with torch.no_grad():
        ours = model(ids).logits.float()
        ref = _reference(tiny_model, QuantSpec(kind))(ids).logits.float()
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"{kind}: logits differ from dequant(quant(W)) reference by {rel:.4f}"  # bf16 rounding


def test_sharded_checkpoint_loads_the_same(tmp_path):
    one = make_tiny_model(tmp_path / "one")
    many = make_tiny_model(tmp_path / "many", max_shard_size="100KB")
    assert len(list(many.glob("*.safetensors"))) > 2 and (many / "model.safetensors.index.json").is_file()
    a, tok, _ = load_base(ModelConfig(str(one)), QuantConfig())
    b, _, _ = load_base(ModelConfig(str(many)), QuantConfig())
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)  # same tensors quantize to the same codes


def test_tied_embeddings_stay_tied(tmp_path):
    folder = make_tiny_model(tmp_path / "tied", tied=True)
    model, _, _ = load_base(ModelConfig(str(folder)), QuantConfig())
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_quantized_bytes_are_small(tiny_model):
    model, _, _ = load_base(ModelConfig(str(tiny_model)), QuantConfig(type="nf4", double_quant=True))
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    weights = sum(m.in_features * m.out_features for m in q)
    stored = sum(b.numel() * b.element_size() for m in q for b in m.quant_tensors().values())

    def expected(numel: int) -> int:  # 4-bit codes + uint8 absmax per 64 + fp32 absmax per 256 blocks + codebooks
        blocks = -(-numel // 64)
        return numel // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4

    assert stored == sum(expected(m.in_features * m.out_features) for m in q)
    assert stored < weights  # under half the bf16 bytes (2 per weight) even at this tiny size
