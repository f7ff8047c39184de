"""`qlora-kit inspect` on what qlora-kit writes: quantized exports (nf4, int8) and GGUF files (model and LoRA adapter),
checked against the model transformers builds from the same folder and against gguf's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch

from conftest import make_tiny_model
from qlora_kit.adapters import peft_format
from qlora_kit.cli.main import main
from qlora_kit.export import formats as ex


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artifacts")
    base = make_tiny_model(tmp / "base")
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(c.num_hidden_layers):
        for m, (o, n) in {"self_attn.q_proj": (c.hidden_size, c.hidden_size),
                          "mlp.down_proj": (c.hidden_size, c.intermediate_size)}.items():
            tensors[f"model.layers.{i}.{m}.lora_A.weight"] = torch.randn(4, n, generator=g) * 0.1
            tensors[f"model.layers.{i}.{m}.lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.1
    adapter = peft_format.save_adapter(tmp / "adapter", tensors, r=4, alpha=8.0, dropout=0.0, rslora=False,
                                       base_model=str(base))
    return tmp, base, adapter


def _inspect(path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _hf_params(folder: Path) -> tuple[int, int]:
    """(parameters, Linear layers but lm_head) of the model transformers builds from `folder`'s config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    return sum(p.numel() for p in model.parameters()), len(linears)


@pytest.mark.parametrize("quant, words", [("nf4", "bitsandbytes nf4, double quant"), ("int8", "bitsandbytes int8")])
def test_inspect_a_quantized_export(base_and_adapter, quant, words, capsys):
    tmp, base, adapter = base_and_adapter
    out = tmp / f"q-{quant}"
    ex.export(adapter, ex.Options("quantized", out, quant=quant, progress=False))
    info = _inspect(out, capsys)
    params, linears = _hf_params(base)
    assert info["kind"] == "quantized model" and words in info["quant"]
    assert info["params"] == params and info["quantized_linears"] == linears
    assert info["size_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert info["layers"] == 2 and info["architecture"] == "LlamaForCausalLM"
    if quant == "nf4":
        assert info["blocksize"] == "64"
    assert main(["inspect", str(out)]) == 0  # the text form: a line per fact, no config dump
    text = capsys.readouterr().out
    assert "quantization_config" not in text and "already quantized" not in text


def test_inspect_gguf_model_and_adapter(base_and_adapter, capsys):
    tmp, base, adapter = base_and_adapter
    model_file, adapter_file = tmp / "m-q8_0.gguf", tmp / "a.gguf"
    ex.export(adapter, ex.Options("gguf", model_file, gguf_type="q8_0", progress=False))
    ex.export(adapter, ex.Options("gguf-adapter", adapter_file, progress=False))
    info = _inspect(model_file, capsys)
    reader = gguf.GGUFReader(str(model_file))
    assert info["kind"] == "gguf model" and info["architecture"] == "llama" and info["layers"] == 2
    assert info["tensors"] == len(reader.tensors)
    assert info["params"] == _hf_params(base)[0]  # every weight of the model, whatever its GGUF type
    assert set(info["tensor_types"]) == {t.tensor_type.name for t in reader.tensors} >= {"Q8_0"}
    assert info["size_bytes"] == model_file.stat().st_size and info["chat_template"] is True
    assert info["vocab_size"] == _vocab(base)
    a = _inspect(adapter_file, capsys)
    assert a["kind"] == "gguf adapter" and a["adapter"] == {"type": "lora", "alpha": 8.0}
    assert a["tensors"] == 2 * 4  # lora_a and lora_b of 2 modules x 2 layers


def _vocab(base: Path) -> int:
    return json.loads((base / "config.json").read_text())["vocab_size"]


def test_inspect_refuses_a_file_that_is_not_gguf(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["inspect", str(bad)]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err
