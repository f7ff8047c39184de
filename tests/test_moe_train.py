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
from archs import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster

# different lengths: a short answer, a long one, and everything between
RECORDS = FACTS + [{"instruction": f"Say it {i} times.", "input": "", "output": "Tamsk is far. " * (i % 5 + 1)}
                   for i in range(10)]
SPEC = QuantSpec("nf4", 64, True, torch.float32)


def _reference_loss(model, examples) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one example at a time: no padding involved
            logits = model(torch.tensor([ex.input_ids])).logits[0].float()
            labels = torch.tensor(ex.labels)
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            n += int((labels[1:] != -100).sum())
    return total / n


def _train(folder, arch, path, out):
    from qlora_kit.train import loop as train

    recipe = tiny_recipe(folder, path, model={"dtype": "fp32"}, quant={"compute_dtype": "fp32"},
                         data={"val_fraction": 0.25}, train={"steps": 2, "batch_size": 3, "lr": 3e-2},
                         lora={"targets": "all-linear"})
    train.run(recipe, out, progress=False)
    return out


@pytest.mark.parametrize("arch", MOE)
def test_train_eval_peft_and_merged_export_agree(arch, tmp_path):
    """One run per architecture: its eval loss equals transformers' with the dequantized weights and PEFT loading
    the adapter, the experts' adapters trained, and the merged export (loaded by transformers) equals the run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.export import formats as export

    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    folder = make_moe_model(tmp_path / arch, arch)
    run = _train(folder, arch, path, tmp_path / "run")
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
    experts_b = [v for k, v in peft_model.state_dict().items() if ".experts." in k and "lora_B" in k]
    assert experts_b and all(b.abs().sum() > 0 for b in experts_b)  # every expert parameter's adapter trained

    # --format adapter reads the fused layout back per expert and writes it again: the same tensors and targets
    export.export(str(run), export.Options("adapter", tmp_path / "adapter", progress=False))
    from safetensors.torch import load_file
    again, saved = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "adapter", run / "adapter"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    import json
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / "adapter", run / "adapter")]
    assert configs[0]["target_parameters"] == configs[1]["target_parameters"]
    if arch.startswith("deepseek"):  # PEFT's v4 shim would misread their MLP names as target_modules (README)
        assert {"gate_proj", "up_proj", "down_proj"}.isdisjoint(configs[1]["target_modules"])
        assert "model.layers.1.mlp.shared_experts.down_proj.weight" in configs[1]["target_parameters"]

    export.export(str(run), export.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                  experts_implementation="eager")
    assert _reference_loss(merged, examples) == pytest.approx(res.loss, rel=1e-5)
    name = next(n for n, _ in merged.named_parameters() if n.endswith("experts.down_proj"))
    orig = dict(reference(folder).named_parameters())[name]
    assert not torch.allclose(orig, dict(merged.named_parameters())[name])  # dequant(quant(W_e)) + delta, not W_e

    if arch == "qwen3_moe":  # this tiny config's router does not renormalise; llama.cpp's qwen3moe always does
        from qlora_kit.errors import ExportError

        with pytest.raises(ExportError, match="unnormalised top-k router weights"):
            export.export(str(run), export.Options("gguf", tmp_path / "m.gguf", gguf_type="f32", progress=False))
        assert not (tmp_path / "m.gguf").exists()
    else:  # the other MoE families' GGUF experts (gguf/experts.py)
        _gguf_experts_are_the_runs(run, peft_model, tmp_path / "m.gguf", tmp_path / "merged")


def _gguf_experts_are_the_runs(run, peft_model, out, merged_dir):
    """The f32 GGUF's expert stacks (dequantized merge base, the default) are PEFT's merge of the run's adapter into
    transformers' fused expert tensors with each (2I, H) slice roundtripped as training quantized it: llama.cpp's
    ffn_gate_exps / ffn_up_exps are its gate and up rows ([gate; up] halves; gpt-oss: interleaved, its (E, H, 2I)
    tensor's even and odd columns), ffn_down_exps its down_proj (DeepSeek: the MoE layers after its dense first one).
    gpt-oss's also equal the fp32 `--format merged` export's tensors (its dequantized base tested above), not the
    checkpoint's."""
    import gguf
    from safetensors.torch import load_file

    from qlora_kit.export import formats as export

    export.export(str(run), export.Options("gguf", out, gguf_type="f32", progress=False))
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(out).tensors}
    merged = dict(peft_model.merge_and_unload().named_parameters())
    folder = load_file(str(merged_dir / "model.safetensors"))
    layers = [n for n in range(2) if f"blk.{n}.ffn_down_exps.weight" in stored]
    assert layers
    for layer in layers:
        p = f"model.layers.{layer}.mlp.experts."
        gate_up, down = merged[p + "gate_up_proj"], merged[p + "down_proj"]
        if gate_up.shape[1] == down.shape[-1]:  # gpt-oss: (E, H, 2I) with gate/up in alternating columns
            cut = {"gate": lambda W: W[..., ::2].transpose(1, 2), "up": lambda W: W[..., 1::2].transpose(1, 2),
                   "down": lambda W: W.transpose(1, 2)}
            for kind, fused in (("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj")):
                got, want = stored[f"blk.{layer}.ffn_{kind}_exps.weight"], cut[kind](folder[p + fused])
                assert torch.allclose(got, want, rtol=0, atol=1e-6), (layer, kind, (got - want).abs().max())
            parts = (("gate", cut["gate"](gate_up)), ("up", cut["up"](gate_up)), ("down", cut["down"](down)))
        else:
            i = gate_up.shape[1] // 2
            parts = (("gate", gate_up[:, :i]), ("up", gate_up[:, i:]), ("down", down))
        for kind, want in parts:
            got = stored[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert torch.allclose(got, want, atol=1e-5), (layer, kind, (got - want).abs().max())
    if "blk.0.ffn_gate.weight" in stored:  # DeepSeek's dense first layer and shared experts (adapted too)
        for k in ("gate", "up", "down"):
            for name, hf in ((f"blk.0.ffn_{k}.weight", f"model.layers.0.mlp.{k}_proj.weight"),
                             (f"blk.1.ffn_{k}_shexp.weight", f"model.layers.1.mlp.shared_experts.{k}_proj.weight")):
                assert torch.allclose(stored[name], merged[hf], atol=1e-5), name
