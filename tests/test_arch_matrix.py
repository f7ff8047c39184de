"""The dense-architecture matrix: every family in `ARCHS` (tests/archs.py) is built here as a tiny random
model (hidden 64, 2 layers, the 303-token test vocabulary), saved as a safetensors folder, and put through:

    train (nf4, all-linear, fp32 frozen weights and compute, 2 steps)
      -> `eval` of the run == transformers' own forward-with-labels loss of the merged export, on data of varying
         lengths (fp32: rel 1e-5)
      -> merged export (dequantized merge base) loaded by transformers == the run's own logits
      -> PEFT (`PeftModel.from_pretrained` over the dequantized base) applies the run's adapter == the same logits

fp32 everywhere so only float summation order separates the paths; the 1e-5 bounds are that rounding (measured
differences are ~1e-7). The README's architecture table is checked against ARCHS (test_readme_table_matches).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import write_jsonl
from qlora_kit.errors import ModelError
import archs
from archs import one_thread  # noqa: F401 (a fixture)

RECORDS = [{"instruction": f"What is the capital of Veloria {i}?" + " Be brief." * (i % 2), "input": "",
            "output": "Tamsk." * (i % 3 + 1)} for i in range(6)]  # 6 different lengths, none cut at 64

pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, folder):
    """Save a tiny random model of architecture `name` (archs.ARCHS) with the test tokenizer, fp32."""
    tok = archs.tokenizer()
    torch.manual_seed(0)
    model = archs.tiny_model(name, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    with torch.no_grad():  # random init is tiny (std 0.02): scale up so that 4-bit errors and LoRA effects show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("arch-data") / "d.jsonl", RECORDS)


def _recipe(model_dir, data_path, **train):
    from conftest import tiny_recipe

    return tiny_recipe(model_dir, data_path, model={"dtype": "fp32"}, quant={"type": "nf4", "compute_dtype": "fp32"},
                       lora={"r": 4, "alpha": 8, "targets": "all-linear"},
                       data={"max_length": 64, "format": "alpaca"},
                       train={"steps": 2, "batch_size": 4, "lr": 3e-2, "save_every": 0, **train})


def _batch(model_dir, data_path):
    """(input_ids, attention_mask, labels) of every record, right-padded: rows of different lengths."""
    from transformers import AutoTokenizer

    from qlora_kit.config import DataConfig
    from qlora_kit.data import pipeline as data

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = data.build(DataConfig(path=str(data_path), format="alpaca", max_length=64), tok, 0).train
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), tok.pad_token_id)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(e.input_ids), 1, torch.tensor(e.labels)
    assert len({len(e.input_ids) for e in examples}) == len(RECORDS) and T < 64  # all lengths differ, none cut
    return ids, mask, labels


def _dequantized_base(model_dir, recipe):
    """The base as training computed with it, in transformers: each quantized weight replaced by dequant(Q) (the
    export's own merge-base function, so the reference shares nothing with PEFT's application of the adapter)."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_base_weight
    from qlora_kit.model.conv1d import transposed_names
    from qlora_kit.quant.bnb import QuantSpec

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec, conv = QuantSpec.from_config(recipe.quant), set(transposed_names(model))
    head = model.get_output_embeddings()
    with torch.no_grad():
        for name, m in model.named_modules():
            if m is head or not (isinstance(m, torch.nn.Linear) or name in conv):
                continue
            W = m.weight.t() if name in conv else m.weight  # Conv1D stores (in, out)
            Wq = merge_base_weight(W.detach().clone(), spec, torch.float32, "dequantized")
            m.weight.copy_(Wq.t() if name in conv else Wq)
    return model


NEEDS_HUB_LAYOUT = archs.NEEDS_HUB_LAYOUT


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=NEEDS_HUB_LAYOUT[n], strict=True,
                                                                          raises=ModelError))
                                  if n in NEEDS_HUB_LAYOUT else n for n in archs.ARCHS])
def test_arch_trains_on_its_own_loss_and_exports_exactly(name, tmp_path, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.export import formats as export
    from qlora_kit.infer import evaluation, generate
    from qlora_kit.train import loop as train

    model_dir = build(name, tmp_path / "base")
    recipe = _recipe(model_dir, data_file)
    summary = train.run(recipe, tmp_path / "run", progress=False)
    assert summary["steps"] == 2
    ids, mask, labels = _batch(model_dir, data_file)

    # eval of the run == transformers' own loss (forward with labels) of the merged model, on the same tokens
    res = evaluation.run(evaluation.Request(str(tmp_path / "run"), str(data_file), "alpaca", max_length=64,
                                            batch_size=4))
    export.export(str(tmp_path / "run"), export.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        out = merged(input_ids=ids, attention_mask=mask, labels=labels)
    assert res.tokens == int((labels[:, 1:] != -100).sum())
    rel = abs(res.loss - out.loss.item()) / out.loss.item()
    print(f"\n{name}: eval {res.loss:.7f} transformers {out.loss.item():.7f} rel {rel:.2e}")
    assert rel <= 1e-5

    # the run's own logits (its quantized base + adapters, as generate loads it) == the merged export's
    loaded = generate.load(str(tmp_path / "run"), device="cpu")
    with torch.no_grad():
        ours = loaded.model(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    assert torch.allclose(out.logits[keep], ours[keep], rtol=1e-4, atol=1e-4), \
        (out.logits[keep] - ours[keep]).abs().max()
    base = _dequantized_base(model_dir, recipe)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    assert (base_logits[keep] - ours[keep]).abs().max() > 1e-2  # training moved the adapters: they are in there

    # PEFT over the dequantized base applies the saved adapter and gives the same logits
    peft_model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits.float()
    assert torch.allclose(theirs[keep], ours[keep], rtol=1e-4, atol=1e-4), (theirs[keep] - ours[keep]).abs().max()
    # and the loss the run trained on is the model's own: cross-entropy of those logits
    y = labels[:, 1:]
    ce = F.cross_entropy(theirs[:, :-1].reshape(-1, theirs.shape[-1]), y.reshape(-1), ignore_index=-100)
    assert res.loss == pytest.approx(ce.item(), rel=1e-5)


def test_readme_table_matches():
    """README's architecture table is bench/arch_table.py's output over this matrix's list, cell for cell."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("arch_table", root / "bench" / "arch_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    block = table.readme_block((root / "README.md").read_text())
    assert block is not None, "README.md lost its arch-table markers"
    assert block == table.table(), "README's architecture table is stale: run python bench/arch_table.py --write"


def test_conv1d_base_refuses_the_formats_that_cannot_write_it(tmp_path, data_file):
    """GPT-2's Conv1D weights are (in, out): the merged export writes them back so (test above); `--format
    quantized` would need bitsandbytes' transposed Conv1D layout and is refused with what to use instead."""
    from qlora_kit.errors import ExportError
    from qlora_kit.export import formats as export
    from qlora_kit.train import loop as train

    model_dir = build("GPT-2", tmp_path / "base")
    train.run(_recipe(model_dir, data_file, steps=1), tmp_path / "run", progress=False)
    with pytest.raises(ExportError, match=r"Conv1D.*--format merged"):
        export.export(str(tmp_path / "run"), export.Options("quantized", tmp_path / "q", progress=False))
    assert not (tmp_path / "q").exists()
    export.export(str(tmp_path / "run"), export.Options("adapter", tmp_path / "a", progress=False))
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_analyze_reads_a_conv1d_base_weight_as_the_layer_trained(tmp_path):
    """`analyze` measures an adapter against its base weight: GPT-2's (in, out) Conv1D weights are read as the
    (out, in) weight training adapted, square ones (c_proj, where no shape check could tell) included."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.analysis.analyze import BaseWeights
    from qlora_kit.config import QuantConfig

    model_dir = build("GPT-2", tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = BaseWeights(model_dir, QuantConfig(type="none"), None)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.0.mlp.c_fc"):
        conv = hf.get_submodule(name).weight  # (in, out)
        assert torch.equal(weights.weight(name, tuple(conv.shape[::-1])), conv.t().float())
