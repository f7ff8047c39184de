"""GGUF export of every dense architecture, tokenizer family and RoPE scaling, checked without llama.cpp: the gguf
package's reader and tensor tables (the names llama.cpp's converter writes), transformers' GGUF loader (logits and
tokenizer rebuilt from our file) and transformers' own RoPE code. llama.cpp runs the same files in
tests/test_llama_cpp_archs.py when the extra is installed."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CORPUS
from gguf_models import MODELS, adapter, build, peft_merged
from qlora_kit.errors import ExportError
from qlora_kit.export import formats as ex
from qlora_kit.export.gguf import ollama

gguf = pytest.importorskip("gguf")
IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3, 8, 120, 64, 2]])
# the loader reads these families' keys completely (others: no gguf->HF mapping, or keys it ignores: head_dim,
# query_pre_attn_scalar, RoPE scaling, learned-position length)
HF_READS = ("llama", "mistral", "qwen2", "phi3", "falcon", "stablelm", "starcoder2")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "phi": "phi2", "falcon": "falcon",
             "stablelm": "stablelm", "starcoder2": "starcoder2", "olmo2": "olmo2", "cohere": "command-r",
             "granite": "granite", "gpt_neox": "gptneox", "gpt2": "gpt2", "mixtral": "llama",
             "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "deepseek_v2": "deepseek2",
             "deepseek_v3": "deepseek2"}


def export(src, out, **kw):
    return ex.export(src, ex.Options(out=Path(out), progress=False, merge_base="original",
                                     **{"format": "gguf", **kw}))


def field(path: Path, key: str):
    f = gguf.GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("name", list(MODELS))
def test_names_shapes_and_keys_are_llama_cpps(name, tmp_path):
    """Every tensor name is one llama.cpp's table (gguf.MODEL_TENSORS) has for the architecture, 2-D shapes are
    (in, out) in ggml order with fused qkv as [q | k | v] rows, and the hparam keys llama.cpp reads are there."""
    base = build(name, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    a = adapter(name, tmp_path / "adapter", base)
    export(a, tmp_path / "m.gguf", gguf_type="f16")
    arch = GGUF_ARCH[config["model_type"]]
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.fields["general.architecture"].contents() == arch
    member = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) + s for t in gguf.MODEL_TENSORS[member]
               for i in range(config.get("num_hidden_layers", 2))
               for s in (".weight", ".bias")}
    names = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert set(names) <= allowed, set(names) - allowed
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    d = config.get("head_dim") or hidden // heads
    kv = 1 if name == "falcon" else config.get("num_key_value_heads", config.get("num_kv_heads", heads))
    assert names["token_embd.weight"] == [hidden, config["vocab_size"]]
    if "blk.0.attn_qkv.weight" in names:
        assert names["blk.0.attn_qkv.weight"] == [hidden, (heads + 2 * kv) * d]
    elif "blk.0.attn_kv_a_mqa.weight" in names:  # DeepSeek's latent attention: test_deepseek_latent_attention_layout
        pass
    else:
        assert names["blk.0.attn_q.weight"] == [hidden, heads * d] and names["blk.0.attn_k.weight"] == [hidden, kv * d]
    if "moe" in name or name in ("mixtral", "gptoss"):
        n = config.get("num_local_experts", config.get("num_experts"))
        ff = config.get("moe_intermediate_size", config["intermediate_size"])
        assert names["blk.1.ffn_gate_exps.weight"] == [hidden, ff, n] and names["blk.1.ffn_down_exps.weight"] == [
            ff, hidden, n] and names["blk.0.ffn_gate_inp.weight"] == [hidden, n]
        assert field(tmp_path / "m.gguf", f"{arch}.expert_count") == n
    keys = set(r.fields)
    for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count", "context_length"):
        assert f"{arch}.{k}" in keys, k
    assert f"{arch}.attention.layer_norm_rms_epsilon" in keys or f"{arch}.attention.layer_norm_epsilon" in keys
    if name == "gemma2":
        assert field(tmp_path / "m.gguf", "gemma2.attn_logit_softcapping") == 50.0
        assert field(tmp_path / "m.gguf", "gemma2.final_logit_softcapping") == 30.0
    if name == "cohere":
        assert field(tmp_path / "m.gguf", "command-r.logit_scale") == 0.25
    if name == "granite":
        assert [field(tmp_path / "m.gguf", f"granite.{k}") for k in ("embedding_scale", "residual_scale",
                "attention.scale", "logit_scale")] == pytest.approx([2.0, 0.5, 0.2, 2.0])


@pytest.mark.parametrize("name", [n for n in MODELS if MODELS[n][0] in HF_READS and "-" not in n])
def test_transformers_reads_our_gguf_with_peft_merged_logits(name, tmp_path):
    """transformers' GGUF loader (its own reverse mapping: q/k permutation undone, fused qkv split) gives the logits
    of PEFT's merge of the adapter into the base."""
    base = build(name, tmp_path / "base")
    a = adapter(name, tmp_path / "adapter", base)
    export(a, tmp_path / "m.gguf", gguf_type="f32")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = peft_merged(base, a)(input_ids=IDS).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)(
            input_ids=IDS).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_gemma_norms_and_gpt2_conv1d_layouts(tmp_path):
    """Gemma's (1 + w) norms are stored as w + 1; GPT-2's Conv1D c_attn (in, out) is stored as llama.cpp's
    (out, in) matrix, i.e. the same numbers in ggml's (in, out) shape."""
    from safetensors.torch import load_file

    for name in ("gemma", "gpt2"):
        base = build(name, tmp_path / name)
        export(adapter(name, tmp_path / f"{name}-a", base), tmp_path / f"{name}.gguf", gguf_type="f32")
        stored = {t.name: t.data for t in gguf.GGUFReader(tmp_path / f"{name}.gguf").tensors}
        hf = load_file(base / "model.safetensors")
        if name == "gemma":
            assert torch.equal(torch.from_numpy(stored["blk.1.attn_norm.weight"].copy()),
                               hf["model.layers.1.input_layernorm.weight"] + 1)
        else:
            assert torch.equal(torch.from_numpy(stored["blk.0.attn_norm.bias"].copy()), hf["transformer.h.0.ln_1.bias"])
            assert stored["blk.0.ffn_up.weight"].shape == (256, 64)  # numpy's (out, in) view of ggml's (in, out)
            assert torch.equal(torch.from_numpy(stored["position_embd.weight"].copy()), hf["transformer.wpe.weight"])


def test_llama3_rope_freqs_are_transformers_own(tmp_path):
    """rope_freqs (llama.cpp divides each frequency by it) equals default / llama3 inverse frequencies as
    transformers' own RoPE initialisation computes them."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base = build("llama-llama3-rope", tmp_path / "base")
    export(adapter("llama-llama3-rope", tmp_path / "a", base), tmp_path / "m.gguf", gguf_type="q8_0")
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert stored["rope_freqs.weight"].tensor_type.name == "F32"
    config = AutoConfig.from_pretrained(base)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    theta, dim = 500000.0, 16
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    factors = torch.from_numpy(stored["rope_freqs.weight"].data.copy()).double()
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the blend occur in this model
    assert torch.allclose(plain / factors, scaled.double(), rtol=1e-5)


def sentencepiece_tokenizer(folder: Path):
    """A 300-piece SentencePiece BPE with byte fallback, trained here, saved as tokenizer.model + tokenizer.json."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_sentencepiece_vocab(name, tmp_path):
    """A SentencePiece tokenizer becomes llama.cpp's `llama` vocabulary: the pieces, scores and types of
    tokenizer.model (read back through the sentencepiece package), and (Llama) transformers' GGUF loader rebuilds a
    tokenizer that encodes strings as the original does."""
    import sentencepiece as spm

    tok = sentencepiece_tokenizer(tmp_path / "tok")
    base = build(name, tmp_path / "base", tokenizer=tok)
    shutil.copy(tmp_path / "tok" / "tokenizer.model", base / "tokenizer.model")
    export(adapter(name, tmp_path / "a", base), tmp_path / "m.gguf", gguf_type="f16")
    path = tmp_path / "m.gguf"
    assert field(path, "tokenizer.ggml.model") == "llama" and field(path, "tokenizer.ggml.pre") == "default"
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    tokens, scores = field(path, "tokenizer.ggml.tokens"), field(path, "tokenizer.ggml.scores")
    types = field(path, "tokenizer.ggml.token_type")
    assert tokens[:sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert scores[5] == pytest.approx(sp.get_score(5)) and types[0] == gguf.TokenType.UNKNOWN
    assert types[1] == gguf.TokenType.CONTROL and types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
    assert field(path, "tokenizer.ggml.bos_token_id") == 1 and field(path, "tokenizer.ggml.add_bos_token") is True
    assert "[INST]" in (tmp_path / "m.Modelfile").read_text()
    if name == "llama":
        from transformers import AutoTokenizer

        ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
        for s in ["hello world", "The capital of Veloria is Tamsk. 12345", "  two  spaces\nand ü newline", "x"]:
            assert ours(s).input_ids == tok(s).input_ids, s


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "lacking the latent attention"),
    ({"architectures": ["BertForMaskedLM"]}, "no mapping"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "no dynamic NTK"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "phi3 graph"),
    ({"rope_parameters": {"rope_type": "longrope_v2", "rope_theta": 1e4}}, "'longrope_v2'"),
    ({"hidden_act": "gelu"}, "SiLU"),
])
def test_refusals_name_what_is_missing(change, message, tmp_path):
    base = build("llama", tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | change))
    a = adapter("llama", tmp_path / "a", build("llama", tmp_path / "orig"))
    with pytest.raises(ExportError, match=message):
        ex.export(a, ex.Options("gguf", tmp_path / "m.gguf", base=str(base), progress=False))
    assert not (tmp_path / "m.gguf").exists()


def test_gemma2_scale_llama_cpp_cannot_run_is_refused(tmp_path):
    base = build("gemma2", tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"query_pre_attn_scalar": 256}))
    with pytest.raises(ExportError, match="query_pre_attn_scalar"):
        export(adapter("gemma2", tmp_path / "a", base), tmp_path / "m.gguf")


@pytest.mark.parametrize("marker, stop", [
    ("<start_of_turn>", "<end_of_turn>"), ("[INST]", "[INST]"), ("<|assistant|>", "<|end|>"),
    ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"), ("<|start_of_role|>", "<|end_of_text|>"),
    ("{{ weird }}", None)])
def test_modelfile_template_families(marker, stop):
    text = ollama.modelfile("m.gguf", {"chat_template": f"{{% for m in messages %}}{marker}{{% endfor %}}",
                                       "stop": ["</s>"]})
    if stop is None:
        assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and "tokenizer.chat_template" in text
    else:
        assert f'PARAMETER stop "{stop}"' in text and 'PARAMETER stop "</s>"' in text
        assert marker.replace("[INST]", "[INST] ") in text
