"""qlora-kit's GGUF reader (export/gguf/reader.py): every family the GGUF export writes, read back into transformers'
own model class, against PEFT's merge of the same adapter over the original model (logits at two lengths), `eval`'s
loss against `eval` of the merged export folder, and the rebuilt tokenizer against the base's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CHATML, write_jsonl
from gguf_models import READ_BACK, adapter, bpe_tokenizer, build, copy_gguf, peft_merged, per_model, pre_tokenizers
from qlora_kit.cli.main import main
from qlora_kit.errors import ModelError
from qlora_kit.export import formats as ex

gguf = pytest.importorskip("gguf")
from qlora_kit.export.gguf import reader  # noqa: E402  (needs gguf)

LONG = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3, 8, 120, 64, 2, 33, 71, 180, 9, 4, 260, 11, 6]])
SHORT = torch.tensor([[7, 250, 3, 8, 120]])
# q8_0 logits of these tiny models (weights std 0.3, so rounding grows through the layers) against the exact merge:
# measured 0.011 (gemma3) .. 0.104 (qwen2-yarn-rope) relative error over the 25 models of gguf_models.READ_BACK other
# than gpt-oss and DeepSeek (theirs: tests/test_gguf_readback_moe.py)
Q8_BOUND = 0.15
MIXED = ["The capital of Veloria is Tamsk. 12345 and 3.14159!", "  two  spaces\nand a newline\t tab",
         "ünïcödé — naïve café 東京 🙂", "x", "don't YOU'RE we'll 1,000,000 ... ?!"]


def export(src, out: Path, kind: str):
    ex.export(src, ex.Options(out=out, progress=False, merge_base="original", format="gguf", gguf_type=kind))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# q8_0 read back on one model per layout change: q/k permuted, fused qkv regrouped, Conv1D transposed, experts
# stacked, norms shifted, and the largest measured error
Q8 = ("llama", "falcon-new-decoder", "gpt2", "mixtral", "gemma2", "qwen2-yarn-rope")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> (folder, base, adapter, PEFT-merged model, f32 GGUF), built once per architecture."""
    def make(name, d):
        base = build(name, d / name)  # the folder's name is general.name's stem: `mistral` must not misread
        a = adapter(name, d / "a", base)
        return d, base, a, peft_merged(base, a), export(a, d / "m.gguf", "f32")
    return per_model(tmp_path_factory, make)


@pytest.mark.parametrize("name", READ_BACK)
def test_every_family_reads_back_as_the_merged_model(name, made):
    """f32: the logits of transformers' own class built from our file equal PEFT's merge (rel < 1e-5) at 20 and 5
    tokens; q8_0: within the measured bound. The class is the one the family table names for the GGUF's
    architecture (a Mistral GGUF runs as Llama, as llama.cpp runs it)."""
    d, base, a, ref, path = made(name)
    model, _ = reader.load(path)
    hf = json.loads((base / "config.json").read_text())["architectures"][0]
    assert type(model).__name__ == ("LlamaForCausalLM" if hf == "MistralForCausalLM" else hf)
    with torch.no_grad():
        for ids in (LONG, SHORT):
            assert rel(model(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5, ids.shape
        if name in Q8:
            q8, _ = reader.load(export(a, d / "q.gguf", "q8_0"))
            assert rel(q8(input_ids=LONG).logits, ref(input_ids=LONG).logits) < Q8_BOUND


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2moe"])
def test_eval_of_the_gguf_is_the_merged_models_loss(name, made, tmp_path, capsys):
    """`qlora-kit eval FILE.gguf --dtype fp32` on texts of varying lengths: the loss of PEFT's merged model (fp32) on
    the same texts tokenized by the base's own tokenizer (the GGUF's rebuilt tokenizer gives the same tokens)."""
    from transformers import AutoTokenizer

    from qlora_kit.config import DataConfig
    from qlora_kit.data import pipeline
    from qlora_kit.infer.evaluation import mean_loss

    _, base, _, ref, path = made(name)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in MIXED])
    assert main(["eval", str(path), "--data", str(data), "--dtype", "fp32", "--device", "cpu", "--json",
                 "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(base)
    examples = pipeline.examples(DataConfig(path=str(data), format="text", packing=False, val_fraction=0.0), tok)
    loss, n = mean_loss(ref, list(examples), pipeline.pad_token_id(tok), 8)
    assert got["kind"] == "gguf" and got["tokens"] == n > 100
    assert got["loss"] == pytest.approx(loss, rel=1e-5)


def test_rebuilt_tokenizer_encodes_as_the_base(tmp_path):
    """Byte-level BPE from the file's tokens, merges and types: the same ids on mixed text (digits, punctuation,
    whitespace runs, non-ASCII), the same special ids and chat template."""
    from transformers import AutoTokenizer

    base = build("qwen2", tmp_path / "base")
    _, tok = reader.load(export(adapter("qwen2", tmp_path / "a", base), tmp_path / "m.gguf", "f32"))
    orig = AutoTokenizer.from_pretrained(base)
    for text in [*MIXED, "<|im_start|>user\nhi<|im_end|>"]:
        assert tok(text).input_ids == orig(text).input_ids, text
        assert tok.decode(tok(text).input_ids) == orig.decode(orig(text).input_ids)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (orig.eos_token_id, orig.bos_token_id,
                                                                      orig.pad_token_id)
    assert tok.chat_template == CHATML


@pytest.mark.parametrize("pre", list(pre_tokenizers()))
def test_every_pre_tokenizer_is_named_and_rebuilt(pre, tmp_path):
    """A byte-level BPE splitting text as llama.cpp's `pre` does: the export names it so (llama.cpp verifies the
    split in test_llama_cpp_pretok.py) and the reader's tokenizer gives the original's ids on mixed text."""
    from gguf_models import MIXED as TEXTS

    tok = bpe_tokenizer(pre)
    base = build("llama", tmp_path / "base", tokenizer=tok)
    export(adapter("llama", tmp_path / "a", base), tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == pre
    got = reader.tokenizer(tmp_path / "m.gguf", reader.metadata(gguf.GGUFReader(tmp_path / "m.gguf")))
    for text in TEXTS:
        assert got(text).input_ids == tok(text).input_ids, text


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_sentencepiece_tokenizer_reads_back(name, tmp_path):
    """A SentencePiece vocabulary (`llama` in the file): the reader's tokenizer gives transformers' ids of the
    original on mixed text, leading spaces and text after a special token included, on a Gemma model too (the
    file's add_space_prefix, not the architecture, decides the dummy prefix)."""
    import shutil

    from gguf_models import MIXED as TEXTS
    from test_gguf_archs import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer(tmp_path / "tok")
    base = build(name, tmp_path / "base", tokenizer=tok)
    shutil.copy(tmp_path / "tok" / "tokenizer.model", base / "tokenizer.model")
    export(adapter(name, tmp_path / "a", base), tmp_path / "m.gguf", "f32")
    got = reader.tokenizer(tmp_path / "m.gguf", reader.metadata(gguf.GGUFReader(tmp_path / "m.gguf")))
    for text in [*TEXTS, " leading space", "a</s>b"]:
        assert got(text).input_ids == tok(text).input_ids, text
        assert got.decode(got(text).input_ids, skip_special_tokens=True) == tok.decode(tok(text).input_ids,
                                                                                       skip_special_tokens=True)


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path):
    """A split no llama.cpp name is known for here (whitespace first, then byte-level) is refused, naming it."""
    from qlora_kit.errors import ExportError

    base = build("llama", tmp_path / "base")
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, spec["pre_tokenizer"]]}
    (base / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match=r"\['WhitespaceSplit', 'ByteLevel'\].*known: gpt-2, smollm"):
        export(adapter("llama", tmp_path / "a", base), tmp_path / "m.gguf", "f32")


@pytest.mark.parametrize("name", ["gemma2", "gptoss", "deepseek3"])
def test_generate_reads_a_gguf(name, made, capsys):
    """`qlora-kit generate FILE.gguf --raw`: the greedy continuation of PEFT's merged model (gpt-oss's sliding
    window and DeepSeek's latent attention through the KV cache too)."""
    from transformers import AutoTokenizer

    _, base, _, ref, path = made(name)
    prompt = "The capital of Veloria is"
    assert main(["generate", str(path), "--prompt", prompt, "--raw", "--max-new-tokens", "6", "--no-stream",
                 "--device", "cpu", "--decode-dtype", "fp32"]) == 0
    got = capsys.readouterr().out.strip()
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert got and got == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_what_the_reader_refuses(tmp_path, capsys):
    """An adapter GGUF, an architecture no family writes, --quant on a GGUF: a message each, exit 2."""
    base = build("llama", tmp_path / "base")
    a = adapter("llama", tmp_path / "a", base)
    ex.export(a, ex.Options(out=tmp_path / "lora.gguf", progress=False, format="gguf-adapter", gguf_type="f32"))
    with pytest.raises(ModelError, match="LoRA adapter"):
        reader.load(tmp_path / "lora.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="'bert'.*does not map back"):
        reader.load(tmp_path / "bert.gguf")
    export(a, tmp_path / "m.gguf", "f32")
    with pytest.raises(ModelError, match="llama.attention.sliding_window"):  # a key it would drop
        reader.load(_with_key(tmp_path / "m.gguf", tmp_path / "w.gguf", "llama.attention.sliding_window", 4))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    for args, words in [(["eval", str(tmp_path / "m.gguf"), "--data", str(data), "--quant", "nf4"], "--quant"),
                        (["generate", str(tmp_path / "m.gguf"), "--prompt", "hi", "--quant", "nf4"], "--quant"),
                        (["generate", str(tmp_path / "m.gguf"), "--prompt", "x: hi", "--adapter", f"x={a}"],
                         "one merged model")]:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (args, err)


def _with_key(src: Path, dst: Path, key: str, value: int) -> Path:
    """A copy of an f32 GGUF with one more uint32 key, as another converter might write it."""
    return copy_gguf(src, dst, keys={key: value})
