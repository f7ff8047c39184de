"""generate.load on an adapter folder written by `peft` itself, with per-module ranks and alphas."""

import torch

from qlora_kit.infer import generate
from qlora_kit.config import QuantConfig


def test_peft_adapter_with_rank_and_alpha_patterns_gives_peft_logits(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                     rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32}, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits.float()
    loaded = generate.load(str(tmp_path / "adapter"), base=str(tiny_model), quant=QuantConfig(type="none"))
    with torch.no_grad():
        got = loaded.model(ids).logits.float()
    assert (got - expected).norm() / expected.norm() < 2e-2  # bf16 rounding; a wrong scale is off by far more


def test_a_prompt_with_a_lone_surrogate_is_refused_before_loading(capsys):
    """A bad escape reaches the tokenizer as a lone surrogate, which it rejects with a TypeError mid-run; the CLI
    refuses it first, exit 2, naming the option (the model folder does not even exist: nothing was loaded)."""
    from cli.main import main

    for args in (["--prompt", "\ud800"], ["--prompt", "hi", "--system", "x\udfff"]):
        assert main(["generate", "/no/such/model", *args]) == 2
        err = capsys.readouterr().err
        assert "lone surrogate" in err and "Traceback" not in err, err
