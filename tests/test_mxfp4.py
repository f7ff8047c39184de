"""gpt-oss as released: its experts stored in MXFP4 (quant/mxfp4.py). The decoded experts are transformers' own
dequantization of the checkpoint; a QLoRA run on it (nf4 over the decoded experts) evaluates to transformers' loss
with PEFT; its merged export gives the run's loss and its f32 GGUF's experts are the merged export's."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from moe_models import make_mxfp4_gpt_oss, reference
from test_moe_train import RECORDS, SPEC, _gguf_experts_are_the_runs, _reference_loss, _train
from qlora_kit.quant import mxfp4
from qlora_kit.quant.bnb import roundtrip
from archs import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster
PROJ = ("gate_up_proj", "down_proj")


def _e2m1(code: int) -> float:
    """An FP4 E2M1 code from the format's definition (sign, 2 exponent bits with bias 1, 1 mantissa bit)."""
    sign, exp, man = -1.0 if code & 8 else 1.0, (code >> 1) & 3, code & 1
    return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))


def test_decode_follows_the_format_in_float64():
    """Every code in both nibbles, exponents across the range: low nibble first, value * 2**(scale - 127)."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 3, 2, 16), dtype=torch.uint8, generator=g)
    blocks[0, 0, 0] = torch.arange(16, dtype=torch.uint8) * 17  # both nibbles of code c: byte 17 c
    scales = torch.randint(100, 150, (2, 3, 2), dtype=torch.uint8, generator=g)
    got = mxfp4.decode(blocks, scales)
    assert got.shape == (2, 64, 3) and got.dtype == torch.bfloat16
    for e in range(2):
        for r in range(3):
            want = [_e2m1(int(b) >> (4 * half) & 15) * 2.0 ** (int(scales[e, r, i // 16]) - 127)
                    for i, b in enumerate(blocks[e, r].reshape(-1)) for half in (0, 1)]
            assert torch.equal(got[e, :, r].double(), torch.tensor(want, dtype=torch.float64)), (e, r)
    with pytest.raises(ValueError, match="expected uint8"):
        mxfp4.decode(blocks, scales[..., :1])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return make_mxfp4_gpt_oss(tmp_path_factory.mktemp("mxfp4") / "gpt-oss")


def test_decoded_experts_are_transformers_dequantization(released):
    """Ours == transformers' convert_moe_packed_tensors == from_pretrained(Mxfp4Config(dequantize=True)), exactly,
    in the export's index and in the loader's unquantized (quant.type none) experts, whose logits then equal
    transformers' model's."""
    from safetensors.torch import load_file
    from transformers import Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from qlora_kit.config import ModelConfig, QuantConfig
    from qlora_kit.export.shards import read_tensor, tensor_index
    from qlora_kit.model.load import load_base

    stored = load_file(str(released / "model.safetensors"))
    ref = reference(released, torch.float32, quantization_config=Mxfp4Config(dequantize=True))
    theirs = dict(ref.named_parameters())
    index = tensor_index(released)
    ours_model = load_base(ModelConfig(path=str(released), dtype="fp32"), QuantConfig(type="none"))[0].eval()
    ids = torch.randint(3, 300, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours_model(ids).logits, ref(ids).logits)
    assert not any(k.endswith((mxfp4.BLOCKS, mxfp4.SCALES)) for k in index)
    for layer in range(2):
        for proj in PROJ:
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            blocks, scales = stored[name + mxfp4.BLOCKS], stored[name + mxfp4.SCALES]
            ours = mxfp4.decode(blocks, scales)
            assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)), name
            assert torch.equal(ours.float(), theirs[name]), name
            loaded = [getattr(ours_model.model.layers[layer].mlp.experts[e], proj).weight for e in range(4)]
            assert torch.equal(torch.stack(loaded).transpose(1, 2), ours.float()), name
            assert index[name].shape == tuple(ours.shape) and torch.equal(read_tensor(index[name]), ours), name
            assert len(ours.unique()) > 16  # the block scales vary


def test_mxfp4_run_evals_as_peft_and_exports(released, tmp_path):
    """A few nf4 QLoRA steps on the MXFP4 base (LoRA on every expert): eval == PEFT over transformers' dequantized
    model with each expert nf4-roundtripped, on rows of different lengths; --format merged gives that loss in
    transformers; the f32 GGUF's experts are the merged export's; adapter and gguf-adapter export; inspect, the
    run's summary and estimate's parameter count see the base right."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

    from qlora_kit.analysis import inspect
    from qlora_kit.config import DataConfig
    from qlora_kit.data import pipeline as data
    from qlora_kit.estimate.count import count_params
    from qlora_kit.export import formats as export
    from qlora_kit.infer import evaluation

    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    run = _train(released, "gpt_oss", path, tmp_path / "run")  # nf4, fp32, LoRA on every expert
    assert json.loads((run / "summary.json").read_text())["base_stored"] == "mxfp4"
    res = evaluation.run(evaluation.Request(str(run), str(path), format="alpaca", max_length=64, batch_size=4))
    examples = data.build(DataConfig(path=str(path), format="alpaca", max_length=64),
                          AutoTokenizer.from_pretrained(released), 0).train
    assert len({len(ex.input_ids) for ex in examples}) > 3  # lengths vary

    ref = reference(released, roundtrip=lambda w: roundtrip(w, SPEC, torch.float32),
                    quantization_config=Mxfp4Config(dequantize=True))
    base_loss = _reference_loss(ref, examples)
    peft_model = PeftModel.from_pretrained(ref, str(run / "adapter")).eval()
    want = _reference_loss(peft_model, examples)
    assert res.loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert abs(want - base_loss) > 1e-3  # the adapter changes the model

    export.export(str(run), export.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                  experts_implementation="eager")
    assert _reference_loss(merged, examples) == pytest.approx(res.loss, rel=1e-5)
    _gguf_experts_are_the_runs(run, peft_model, tmp_path / "m.gguf", tmp_path / "merged")

    export.export(str(run), export.Options("adapter", tmp_path / "adapter", progress=False))
    export.export(str(run), export.Options("gguf-adapter", tmp_path / "a.gguf", progress=False))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and (tmp_path / "a.gguf").is_file()

    facts = inspect.describe(str(released))
    assert facts["params"] == sum(p.numel() for p in merged.parameters())  # blocks count 2 weights a byte
    assert "mxfp4" in facts["stored_quantization"]
    shapes = count_params(json.loads((released / "config.json").read_text()))
    assert shapes.total == facts["params"]


def test_other_methods_and_incomplete_blocks_are_refused(released, tmp_path):
    """Only MXFP4 (and bitsandbytes) checkpoints load; an MXFP4 projection missing its scales is named, in the
    loader and in the export's index."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora_kit.config import ModelConfig, QuantConfig
    from qlora_kit.errors import ModelError
    from qlora_kit.export.shards import tensor_index
    from qlora_kit.model.load import load_base

    gptq, cut = shutil.copytree(released, tmp_path / "gptq"), shutil.copytree(released, tmp_path / "cut")
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ModelError, match="quantized with 'gptq'"):
        load_base(ModelConfig(path=str(gptq)), QuantConfig())
    state = load_file(str(cut / "model.safetensors"))
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, str(cut / "model.safetensors"), metadata={"format": "pt"})
    for call in (lambda: load_base(ModelConfig(path=str(cut)), QuantConfig()), lambda: tensor_index(cut)):
        with pytest.raises(ModelError, match="layers.1.mlp.experts.down_proj_blocks has no matching _scales"):
            call()
