"""DoRA, IA3 and LoftQ on every dense architecture of the matrix (tests/archs.py): a short nf4 run (fp32 frozen
weights and compute), its merged export (dequantized merge base) loaded by transformers gives the run's logits,
and PEFT applies the run's adapters over the base training computed with (dequant(Q), LoftQ's offsets included)
with the same logits. IA3's targets are each architecture's own names (its attention's input projections, the
MLP's output layer): Llama's defaults would not all exist elsewhere, which is refused (test_ia3_defaults...).
"""

from __future__ import annotations

import pytest
import torch

import archs
from archs import one_thread  # noqa: F401 (a fixture)
from conftest import FACTS, write_jsonl
from qlora_kit.errors import ModelError
from test_arch_matrix import NEEDS_HUB_LAYOUT, RECORDS, _batch, _recipe, build

# architecture -> (IA3 outputs: attention projections, IA3 inputs: the MLP's output layer)
IA3 = {"Phi": (["k_proj", "v_proj"], ["fc2"]), "Falcon": (["query_key_value"], ["dense_4h_to_h"]),
       "Starcoder2": (["k_proj", "v_proj"], ["mlp.c_proj"]), "GPT-NeoX": (["query_key_value"], ["dense_4h_to_h"]),
       "GPT-2": (["c_attn"], ["mlp.c_proj"]), "Phi-3": (["qkv_proj"], ["down_proj"])}
METHODS = {"dora+ia3": lambda n: {"lora": {"dora": True},
                                  "ia3": dict(zip(("outputs", "inputs"), IA3.get(n, (["k_proj", "v_proj"],
                                                                                     ["down_proj"]))))},
           "loftq": lambda n: {"lora": {"init": "loftq", "loftq_iters": 2}}}

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(model_dir, recipe, offsets):
    """transformers' model with each quantized weight replaced by what training multiplied by."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_base_weight
    from qlora_kit.model.conv1d import transposed_names
    from qlora_kit.quant.bnb import QuantSpec

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec, conv, head = QuantSpec.from_config(recipe.quant), set(transposed_names(model)), model.get_output_embeddings()
    with torch.no_grad():
        for name, m in model.named_modules():
            if m is head or not (isinstance(m, torch.nn.Linear) or name in conv):
                continue
            W = m.weight.t() if name in conv else m.weight
            Wq = merge_base_weight(W.detach().clone(), spec, torch.float32, "dequantized", offset=offsets.get(name))
            m.weight.copy_(Wq.t() if name in conv else Wq)
    return model


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=NEEDS_HUB_LAYOUT[n], strict=True,
                                                                          raises=ModelError))
                                  if n in NEEDS_HUB_LAYOUT else n for n in archs.ARCHS])
def test_method_run_exports_exactly_and_loads_in_peft(name, method, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.adapters import loftq
    from qlora_kit.export import formats as export
    from qlora_kit.infer import generate
    from qlora_kit.train import loop as train

    model_dir = build(name, tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    recipe = _recipe(model_dir, data, steps=1)
    sections = METHODS[method](name)
    raw = recipe.to_dict()
    for k, v in sections.items():
        raw[k] = {**(raw.get(k) or {}), **v}
    from qlora_kit.config import recipe_from_dict

    recipe = recipe_from_dict(raw)
    train.run(recipe, tmp_path / "run", progress=False)
    ids, mask, _ = _batch(model_dir, data)
    keep = mask.bool()
    with torch.no_grad():
        ours = generate.load(str(tmp_path / "run"), device="cpu").model(input_ids=ids, attention_mask=mask).logits

    export.export(str(tmp_path / "run"), export.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs[keep], ours[keep], rtol=1e-4, atol=1e-4)

    offsets = loftq.load(tmp_path / "run") if method == "loftq" else {}  # module -> (B, A) of W's offset
    base = _base(model_dir, recipe, offsets)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert (plain[keep] - ours[keep]).abs().max() > 1e-3  # the adapters are really there
    folders = [tmp_path / "run" / "adapter"] + ([tmp_path / "run" / "adapter" / "ia3"] if "ia3" in sections else [])
    model = base
    for k, f in enumerate(folders):  # the documented order: LoRA/DoRA merged, then IA3 over it
        model = PeftModel.from_pretrained(model, f).eval()
        if k < len(folders) - 1:
            model = model.merge_and_unload()
    with torch.no_grad():
        peft_logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(peft_logits[keep], ours[keep], rtol=1e-4, atol=1e-4)


def test_ia3_defaults_missing_in_an_architecture_are_refused(tmp_path):
    """Llama's default IA3 inputs (down_proj) do not exist in Phi: refused, naming Phi's layers, not skipped."""
    from qlora_kit.train.prepare import prepare
    from qlora_kit.config import recipe_from_dict
    from qlora_kit.errors import ConfigError

    model_dir = build("Phi", tmp_path / "base")
    raw = _recipe(model_dir, write_jsonl(tmp_path / "d.jsonl", FACTS[:4])).to_dict()
    raw["ia3"] = {}
    with pytest.raises(ConfigError, match=r"ia3.inputs entries \['down_proj'\].*fc2"):
        prepare(recipe_from_dict(raw))
