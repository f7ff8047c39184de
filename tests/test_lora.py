"""lora.py on plain nn.Linear (no quantization needed): parity, targets, scaling, names."""

import math

import pytest
import torch
from torch import nn

from qlora_kit.adapters.lora import (LoRALinear, LoraSpec, adapter_state_dict, disabled, inject, load_adapter_state,
                                     merge, param_report)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "v_proj": nn.Linear(16, 8, bias=False)})
        self.mlp = nn.Linear(8, 32)
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, x):
        return self.lm_head(self.mlp(self.attn["v_proj"](self.attn["q_proj"](x))))


def test_untrained_adapter_changes_nothing_exactly():
    torch.manual_seed(0)
    base = nn.Linear(16, 24).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    expected = base(x)
    lora = LoRALinear(base, LoraSpec(4, 8))
    assert torch.equal(lora(x), expected)  # B = 0: bitwise equal, not just close
    assert lora.lora_A.weight.abs().sum() > 0 and lora.lora_B.weight.abs().sum() == 0


def test_merged_equals_unmerged():
    torch.manual_seed(1)
    base = nn.Linear(16, 24, bias=False)
    lora = LoRALinear(base, LoraSpec(4, 8, dtype=torch.float32))
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(5, 16)
    merged = merge(base.weight, lora.lora_A.weight, lora.lora_B.weight, lora.scaling, torch.float32)
    torch.testing.assert_close(lora(x), x @ merged.T, rtol=1e-5, atol=1e-5)


def test_scaling_and_rslora():
    assert LoraSpec(16, 32).scaling == 2.0
    assert LoraSpec(16, 32, rslora=True).scaling == 32 / math.sqrt(16)


def test_gaussian_init_and_dtype():
    torch.manual_seed(2)
    lora = LoRALinear(nn.Linear(512, 64), LoraSpec(8, 16, init="gaussian"))
    assert lora.lora_A.weight.dtype == torch.bfloat16
    assert abs(lora.lora_A.weight.float().std().item() - 1 / 8) < 0.01


def test_targets_all_linear_list_regex():
    def names(targets):
        return inject(Tiny(), targets, LoraSpec(2, 4))

    assert names("all-linear") == ["attn.q_proj", "attn.v_proj", "mlp"]  # never lm_head
    assert names(["q_proj"]) == ["attn.q_proj"]
    assert names(r"attn\.(q|v)_proj") == ["attn.q_proj", "attn.v_proj"]
    with pytest.raises(ValueError, match="q_proj"):  # lists what exists
        names(["nope"])


def test_only_adapters_train_and_report():
    m = Tiny()
    inject(m, "all-linear", LoraSpec(2, 4))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    rep = param_report(m)
    assert rep.trainable == 2 * (16 + 16) + 2 * (16 + 8) + 2 * (8 + 32)
    assert rep.total == sum(p.numel() for p in m.parameters())
    assert f"{rep.percent:.3f}%" in str(rep)


def test_adapter_names_are_peft_names_and_round_trip():
    m = Tiny()
    inject(m, ["q_proj"], LoraSpec(2, 4))
    sd = adapter_state_dict(m)
    assert set(sd) == {"attn.q_proj.lora_A.weight", "attn.q_proj.lora_B.weight"}
    assert sd["attn.q_proj.lora_A.weight"].shape == (2, 16) and sd["attn.q_proj.lora_B.weight"].shape == (16, 2)
    other = Tiny()
    inject(other, ["q_proj"], LoraSpec(2, 4))
    new = {k: torch.randn_like(v) for k, v in sd.items()}
    load_adapter_state(other, new)
    assert all(torch.equal(adapter_state_dict(other)[k], v) for k, v in new.items())
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(other, {k: torch.randn(3, 3) for k in sd})


def test_disabled_gives_base_output():
    torch.manual_seed(3)
    m = Tiny()
    x = torch.randn(2, 16)
    expected = m(x)
    inject(m, "all-linear", LoraSpec(2, 4, dtype=torch.float32))
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            nn.init.normal_(mod.lora_B.weight)
    assert not torch.allclose(m(x), expected)
    with disabled(m):
        assert torch.equal(m(x), expected)
    assert not torch.allclose(m(x), expected)
