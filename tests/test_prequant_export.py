"""Export of a run trained on a pre-quantized base, from that base itself (no 16-bit weights anywhere): the stored
codes dequantized, then merged. The merged model is the model the run trained (its logits), PEFT over the base
dequantized by bitsandbytes itself gives the same, the 4-bit formats keep the stored codes as they are, GGUF reads
back as the merge, and a Hub-cache id works as the base. A 16-bit --base still merges onto the original weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny_recipe
from test_export import hf_model, logits, no_warnings, rel, training_time_model
from test_hub import REV_A, _snapshot
from test_prequant import _prequantized
from qlora_kit.errors import ExportError
from qlora_kit.export import formats as ex
from qlora_kit.export.shards import read_tensor, tensor_index


def _train(pre, data, run, **lora):
    from qlora_kit.train import loop as train

    recipe = tiny_recipe(pre, data, quant={"compute_dtype": "fp32"}, train={"steps": 3, "save_every": 0},
                         lora={"dropout": 0.0, **lora})
    train.run(recipe, run, progress=False)
    return run


def _export(run, out, fmt="merged", **kw):
    return ex.export(run, ex.Options(fmt, out, progress=False, **kw))


@pytest.fixture(scope="module")
def nf4(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("pre-nf4")
    base, pre = _prequantized(tmp, "nf4")
    return base, pre, _train(pre, tiny_data, tmp / "run", targets=["q_proj", "v_proj", "down_proj"])


def test_merged_from_stored_codes_is_the_trained_model(nf4, tmp_path):
    """fp32 compute: the merged export's logits (transformers loading it) equal the training-time model's (the
    pre-quantized base + adapter as qlora-kit trained it); the output says the weights are the dequantized codes."""
    _, pre, run = nf4
    result = _export(run, tmp_path / "m", dtype="fp32")
    assert any("pre-quantized" in n and "not the original 16-bit" in n for n in result.notes)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
    with no_warnings():
        merged = hf_model(tmp_path / "m")
    ref = logits(training_time_model(run))
    assert rel(logits(merged), ref) < 1e-5
    assert set(tensor_index(tmp_path / "m")) == set(tensor_index(nf4[0]))  # no stored-codes tensors left


def test_peft_over_bitsandbytes_dequantized_base_equals_the_merge(nf4, tmp_path):
    """An independent route: transformers loads the pre-quantized folder through bitsandbytes, bitsandbytes
    dequantizes each Linear4bit, the result is a plain fp32 model that PEFT applies the run's adapter to."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, pre, run = nf4
    _export(run, tmp_path / "m", dtype="fp32")
    q = AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32)
    plain = hf_model(base)
    four_bit = {n for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(four_bit) == 14  # 7 Linears x 2 layers
    sd = {}
    for name, _ in plain.named_parameters():
        m = q.get_submodule(name.rpartition(".")[0])
        if name.rpartition(".")[0] in four_bit:  # dequantized in fp32, the run's compute dtype
            state = m.weight.quant_state
            state.dtype = torch.float32
            sd[name] = bnbF.dequantize_4bit(m.weight.data, state)
        else:  # embeddings, norms: as the pre-quantized folder stores them
            sd[name] = q.get_parameter(name).detach().float()
    plain.load_state_dict(sd)
    peft = PeftModel.from_pretrained(plain, run / "adapter").eval()
    assert rel(logits(peft), logits(hf_model(tmp_path / "m"))) < 1e-5


def test_four_bit_formats_keep_the_stored_codes(nf4, tmp_path):
    """quantized-adapter: every stored code, absmax and quant map as in the pre-quantized folder. quantized: the
    unadapted Linears keep their codes bit for bit; the adapted ones are merged and quantized again."""
    _, pre, run = nf4
    stored = {k: read_tensor(v) for k, v in tensor_index(pre).items()}
    _export(run, tmp_path / "qa", "quantized-adapter")
    qa = {k: read_tensor(v) for k, v in tensor_index(tmp_path / "qa").items()}
    assert set(qa) == set(stored)
    blobs = [k for k in stored if ".quant_state." in k]
    assert blobs and all(torch.equal(qa[k], stored[k]) for k in stored if k not in blobs and ".weight." in k)
    for k in blobs:  # the same state; the dtype it dequantizes to is the run's compute dtype
        a, b = (json.loads(bytes(t.tolist())) for t in (qa[k], stored[k]))
        assert {**a, "dtype": None} == {**b, "dtype": None} and a["dtype"] == "float32"
    assert (tmp_path / "qa" / "adapter" / "adapter_model.safetensors").is_file()
    _export(run, tmp_path / "q", "quantized", allow_lossy=True)
    q = {k: read_tensor(v) for k, v in tensor_index(tmp_path / "q").items()}
    for m in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):  # not adapted
        assert torch.equal(q[f"{m}.weight"], stored[f"{m}.weight"])
        assert torch.equal(q[f"{m}.weight.absmax"], stored[f"{m}.weight.absmax"])


def test_gguf_from_stored_codes_reads_back_as_the_merge(nf4, tmp_path):
    from test_gguf import hf_logits

    _, _, run = nf4
    _export(run, tmp_path / "m", dtype="fp32")
    out = tmp_path / "m" / "x.gguf"
    ex.export(run, ex.Options("gguf", out, progress=False, gguf_type="f32"))
    assert rel(hf_logits(tmp_path / "m", "x.gguf"), hf_logits(tmp_path / "m")) < 1e-6


def test_sixteen_bit_base_and_refusals(nf4, tmp_path):
    """--base ORIGINAL (16-bit): the default merge recomputes the stored codes (quantizing the original is
    bit-identical to them), so it writes exactly the stored-codes export; --merge-base original merges onto W
    itself; --merge-base original without the 16-bit weights is refused."""
    base, _, run = nf4
    _export(run, tmp_path / "codes", dtype="fp32")
    _export(run, tmp_path / "recomputed", dtype="fp32", base=str(base))
    a, b = tensor_index(tmp_path / "codes"), tensor_index(tmp_path / "recomputed")
    assert all(torch.equal(read_tensor(a[k]), read_tensor(b[k])) for k in a)
    _export(run, tmp_path / "orig", dtype="fp32", base=str(base), merge_base="original")
    name = "model.layers.0.mlp.gate_proj.weight"  # not adapted: the original W, not its dequantized codes
    o = read_tensor(tensor_index(tmp_path / "orig")[name])
    assert torch.equal(o, read_tensor(tensor_index(base)[name]).float()) and not torch.equal(o, read_tensor(a[name]))
    with pytest.raises(ExportError, match="pre-quantized, so its original 16-bit weights"):
        _export(run, tmp_path / "x", merge_base="original")


def test_sixteen_bit_base_when_the_trained_model_is_gone_says_so(nf4, tmp_path):
    """--base 16-bit while the pre-quantized model the run trained on cannot be found: its stored settings are
    unknown, so the merge base is --base quantized with the recipe's settings, and the export says so."""
    base, pre, run = nf4
    away = pre.with_name(pre.name + "-away")
    pre.rename(away)
    try:
        result = _export(run, tmp_path / "m", dtype="fp32", base=str(base))
    finally:
        away.rename(pre)
    assert any("is not found here" in n and "--merge-base original" in n for n in result.notes), result.notes
    assert not any("is not found here" in n for n in _export(run, tmp_path / "n", dtype="fp32", base=str(base)).notes)


def test_int8_base_from_a_hub_cache(tmp_path, tiny_data, monkeypatch):
    """An int8 pre-quantized model named by Hub id (an offline cache laid out as huggingface_hub writes it): the
    run trains on it and its merged export is the trained model."""
    from huggingface_hub import constants

    _, pre = _prequantized(tmp_path, "int8")
    cache = tmp_path / "hub"
    _snapshot(cache, "org/tiny-int8", REV_A, pre, ("main",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.rmtree(pre)  # only the cache holds it
    run = _train("org/tiny-int8", tiny_data, tmp_path / "run")
    result = _export(run, tmp_path / "m", dtype="fp32")
    assert any("int8" in n for n in result.notes)
    assert rel(logits(hf_model(tmp_path / "m")), logits(training_time_model(run))) < 1e-5
