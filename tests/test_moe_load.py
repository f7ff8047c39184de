"""Hub-layout checkpoints (per-expert weights, renamed keys) load through transformers' own conversion rules, with
each expert quantized on its own: logits equal transformers' from_pretrained (unquantized: exactly; nf4: a
reference whose weights are dequant(quant(W)), per Linear and per expert slice)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from moe_models import ARCHS, MOE, make_moe_model, padded_batch, reference
from qlora_kit.config import ModelConfig, QuantConfig
from qlora_kit.model.load import load_base
from qlora_kit.model.moe import Experts
from qlora_kit.quant.bnb import QuantLinear, QuantSpec, roundtrip
from archs import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster

LENGTHS = [13, 5, 9]  # rows of different lengths, right-padded


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {a: make_moe_model(root / a, a) for a in ARCHS}


def _logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.float()
    return [out[i, : int(mask[i].sum())] for i in range(len(ids))]


def test_checkpoints_are_in_the_hub_layout(folders):
    """The premise: save_pretrained writes per-expert tensors (what people download), not the fused stacks."""
    for arch in MOE:
        with safe_open(str(folders[arch] / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        if arch == "gpt_oss":  # gpt-oss ships fused (E, H, 2I) stacks on the Hub too
            assert any(k.endswith("experts.gate_up_proj") for k in keys)
        else:
            assert any(".experts.0." in k for k in keys) and not any(k.endswith("gate_up_proj") for k in keys), arch
    with safe_open(str(folders["gpt_neox"] / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in f.keys()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_unquantized_logits_equal_transformers(folders, arch):
    model, _, _ = load_base(ModelConfig(path=str(folders[arch]), dtype="fp32"), QuantConfig(type="none"))
    ref = reference(folders[arch])
    ids, mask = padded_batch(LENGTHS)
    for a, b in zip(_logits(model, ids, mask), _logits(ref, ids, mask)):
        assert torch.equal(a, b), (arch, (a - b).abs().max())


@pytest.mark.parametrize("arch", MOE)
def test_nf4_experts_equal_dequantized_reference(folders, arch):
    spec = QuantSpec("nf4", 64, True, torch.float32)
    model, _, _ = load_base(ModelConfig(path=str(folders[arch]), dtype="fp32"),
                            QuantConfig(type="nf4", compute_dtype="fp32"))
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(isinstance(getattr(e, p), QuantLinear) for m in experts for e in m
                           for p in ("gate_up_proj", "down_proj"))
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]  # no 16-bit expert stack left
    ref = reference(folders[arch], roundtrip=lambda w: roundtrip(w, spec, torch.float32))
    ids, mask = padded_batch(LENGTHS)
    for a, b in zip(_logits(model, ids, mask), _logits(ref, ids, mask)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _nf4_bytes(out_f: int, in_f: int, blocksize: int = 64) -> int:
    """Bytes of one double-quantized nf4 weight: 4-bit codes, uint8 absmax per block, fp32 absmax per 256 blocks,
    the 256-entry fp32 nested code, the 16-entry fp32 code and the fp32 offset."""
    n = out_f * in_f
    blocks = -(-n // blocksize)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_frozen_experts_resident_bytes_are_their_quantized_size(folders, arch):
    model, _, _ = load_base(ModelConfig(path=str(folders[arch])), QuantConfig(type="nf4"))
    for m in (m for m in model.modules() if isinstance(m, Experts)):
        held = sum(t.numel() * t.element_size() for t in m.parameters())
        want = sum(_nf4_bytes(getattr(e, p).out_features, getattr(e, p).in_features)
                   for e in m for p in ("gate_up_proj", "down_proj"))
        assert held == want
        bf16 = sum(2 * getattr(e, p).out_features * getattr(e, p).in_features for e in m
                   for p in ("gate_up_proj", "down_proj"))
        assert held < 0.5 * bf16  # at this tiny size the fixed code tables weigh in; ~0.28x at real sizes


def test_experts_dequantize_one_at_a_time_only_when_hit(folders, monkeypatch):
    """Each dequantization is one expert's (out, in) weight, and only the experts the router picked run."""
    model, _, _ = load_base(ModelConfig(path=str(folders["mixtral"]), dtype="fp32"), QuantConfig(type="nf4"))
    shapes, calls = [], []
    real = QuantLinear.dequantize

    def counting(self, dtype=None):
        w = real(self, dtype)
        shapes.append(tuple(w.shape))
        calls.append(id(self))
        return w

    monkeypatch.setattr(QuantLinear, "dequantize", counting)
    experts = [m for m in model.modules() if isinstance(m, Experts)][0]
    x = torch.randn(3, 64)
    idx = torch.tensor([[0, 2], [2, 0], [0, 2]])  # experts 1 and 3 get no token
    experts(x, idx, torch.full((3, 2), 0.5))
    ran = {id(getattr(experts[e], p)) for e in (0, 2) for p in ("gate_up_proj", "down_proj")}
    assert set(calls) == ran and len(calls) == 4
    assert all(len(s) == 2 for s in shapes)


@pytest.mark.parametrize("lora,why", [
    ({"dropout": 0.1}, "dropout"),
    ({"dora": True}, "dora on mixture-of-experts"),
    ({"targets": r".*\.experts\.0\.(gate_up_proj|down_proj)"}, "only some experts"),
    ({"targets": r".*layers\.0\.mlp\.experts\.\d+\.down_proj|.*layers\.1\.mlp\.experts\.\d+\.gate_up_proj"},
     "different projections per layer"),
])
def test_expert_adapters_peft_cannot_hold_are_refused(folders, tmp_path, lora, why):
    """PEFT's LoRA on fused expert parameters has no dropout, no DoRA, and adapts every expert or none: such a run
    is refused before training, not saved as an adapter that loads differently."""
    from conftest import FACTS, tiny_recipe, write_jsonl
    from qlora_kit.errors import ConfigError
    from qlora_kit.train import prepare

    path = write_jsonl(tmp_path / "d.jsonl", FACTS)
    with pytest.raises(ConfigError, match=why):
        prepare.prepare(tiny_recipe(folders["mixtral"], path, lora={"dropout": 0.0} | lora))
