"""Every dense architecture GGUF export writes, run by llama.cpp itself (the xllamacpp wheel; skipped without the
`llama-cpp` extra). References we did not write: transformers' forward of PEFT's merge of a random LoRA into a tiny
random base (greedy tokens, log-probabilities), and llama.cpp's own `--lora` path on the base GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_models import ADAPTER_GGUF_TARGETS, MODELS, MOE, adapter, build, peft_merged, per_model
from qlora_kit.adapters import peft_format
from qlora_kit.export import formats as ex

xlc = pytest.importorskip("xllamacpp", reason="llama.cpp runtime not installed: pip install 'qlora-kit[llama-cpp]'")
gguf = pytest.importorskip("gguf")
from test_llama_cpp import hf_greedy, llama_greedy, server  # noqa: E402  (after the skip: it imports xllamacpp)

PROMPTS = ((1, 5, 17, 42), (1, 99, 7, 250, 3), (2, 8, 120, 64, 33, 201, 17, 9, 90))


def export(src, out, **kw):
    return ex.export(src, ex.Options(out=Path(out), progress=False, merge_base="original",
                                     **{"format": "gguf", **kw}))


def banned_of(base: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [i for i in range(len(tok)) if i in tok.all_special_ids or "\ufffd" in tok.decode([i])]


def deepseek(name: str) -> bool:
    """DeepSeek's adapters hold every kind of module its GGUF takes, the routed experts too (the other MoE families'
    expert LoRA: test_llama_cpp_moe.py)."""
    return MODELS[name][0].startswith("deepseek")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> (folder, base, adapter, PEFT-merged model), built once per architecture."""
    def make(name, d):
        base = build(name, d / "base")
        a = adapter(name, d / "adapter", base, experts=deepseek(name))
        return d, base, a, peft_merged(base, a)
    return per_model(tmp_path_factory, make)


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_gguf_greedy_equals_transformers(name, made):
    """f32 and f16 GGUFs of the merge: llama.cpp's greedy tokens equal transformers' on PEFT's merged model for every
    prompt (lengths 4, 5, 9), and its top-5 log-probabilities agree (f32: float rounding; f16: f16 weights and
    ggml's f16 activations for f16 matmuls). Where transformers' two best tokens are closer than the f16 error can
    reach (a third of the bound), f16 greedy decoding may take either: tokens agree up to that step, and there the
    file's token is one of the two."""
    d, base, a, model = made(name)
    banned = banned_of(base)
    for kind, bound in (("f32", 1e-2), ("f16", 0.15)):
        export(a, d / f"m-{kind}.gguf", gguf_type=kind)
        srv, err = server(d / f"m-{kind}.gguf"), 0.0
        for prompt in PROMPTS:
            ours, ref = llama_greedy(srv, prompt, banned)
            theirs, logps = hf_greedy(model, prompt, banned)
            n, two = first_tie(logps, banned, 0.0 if kind == "f32" else bound / 3)
            err = max(err, *(abs(v - float(lp[i])) for lp, step in zip(logps[: n + 1], ref) for i, v in step.items()))
            assert ours[:n] == theirs[:n] and (n == len(theirs) or ours[n] in two), (name, kind, prompt)
        print(f"{name} {kind}: max |log p| difference {err:.2e}")
        assert err < bound, (name, kind, err)


def first_tie(logps, banned: list[int], tie: float) -> tuple[int, list[int]]:
    """(first step whose two best allowed tokens are within `tie` in log p, those two), or (steps, [])."""
    for k, lp in enumerate(logps):
        allowed = lp.float().clone()
        allowed[banned] = float("-inf")
        top = allowed.topk(2)
        if float(top.values[0] - top.values[1]) < tie:
            return k, top.indices.tolist()
    return len(logps), []


@pytest.mark.parametrize("name", list(MODELS))
def test_base_gguf_plus_adapter_gguf_equals_merged_gguf(name, made):
    """The base as an f32 GGUF (the export of a zero adapter) + our adapter GGUF through llama.cpp's LoRA path give
    the tokens and log-probabilities of our merged f32 GGUF; the adapter moves them (else the check is empty)."""
    d, base, a, _ = made(name)
    if name in ADAPTER_GGUF_TARGETS:  # the modules llama.cpp's graph applies a LoRA to
        a = adapter(name, d / "adapter-gguf", base, targets=ADAPTER_GGUF_TARGETS[name], experts=deepseek(name))
    banned = banned_of(base)
    loaded = peft_format.load_adapter(a)
    zero = d / "zero"
    peft_format.save_adapter(zero, {k: v * 0 if "lora_B" in k else v for k, v in loaded.tensors.items()}, r=4,
                             alpha=8.0, dropout=0.0, rslora=False, base_model=str(base))
    export(zero, d / "base.gguf", gguf_type="f32")
    export(a, d / "merged.gguf", gguf_type="f32")
    export(a, d / "lora.gguf", format="gguf-adapter", gguf_type="f32")
    merged, with_lora, plain = (server(d / "merged.gguf"), server(d / "base.gguf", d / "lora.gguf"),
                                server(d / "base.gguf"))
    err = moved = 0.0
    for prompt in PROMPTS:
        tokens, lps = llama_greedy(merged, prompt, banned)
        tokens_lora, lps_lora = llama_greedy(with_lora, prompt, banned)
        assert tokens_lora == tokens, (name, prompt)
        err = max(err, *(abs(x[i] - y.get(i, -99.0)) for x, y in zip(lps, lps_lora) for i in x))
        _, lps_base = llama_greedy(plain, prompt, banned)
        moved = max(moved, *(abs(v - lps_base[0].get(i, -99.0)) for i, v in lps[0].items()))
    print(f"{name}: base+lora vs merged max |log p| difference {err:.2e}; the adapter moves log p by {moved:.2f}")
    assert err < 2e-3 and moved > 0.05, (name, err, moved)


@pytest.mark.parametrize("name", [n for n in MODELS if "rope" not in n and n not in MOE])
def test_k_quant_runs_in_llama_cpp(name, tmp_path):
    """q4_k_m on a hidden-256 model of each architecture (rows fill K blocks): every tensor's type is llama.cpp's
    mix, every tensor dequantized by the gguf package is within Q4_K's error of the f16 file, and llama.cpp runs the
    file as it runs the gguf package's decoding of the same blocks."""
    base = build(name, tmp_path / "base", hidden=256)
    a = adapter(name, tmp_path / "adapter", base)
    banned = banned_of(base)
    export(a, tmp_path / "m-f16.gguf", gguf_type="f16")
    export(a, tmp_path / "m-q4_k_m.gguf", gguf_type="q4_k_m")
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type)
           for t in gguf.GGUFReader(tmp_path / "m-f16.gguf").tensors}
    falcon = MODELS[name][0] == "falcon"
    # llama.cpp's q4_k_m mix on 2 layers, stated here: use_more_bits picks layer 1 (attn_v, ffn_down: Q6_K; Falcon's
    # ffn_down: Q5_K; a fused qkv as attn_v: category_is_attn_v), the output (or tied embedding) Q6_K (Falcon:
    # Q8_0), positions f32; rows not a multiple of 256 (Gemma's 64-wide attention output) take the fallback Q5_0/Q8_0
    want = {"blk.1.attn_v.weight": "Q6_K", "blk.0.attn_v.weight": "Q4_K", "blk.0.ffn_down.weight": "Q4_K",
            "blk.1.ffn_down.weight": "Q5_K" if falcon else "Q6_K", "blk.0.attn_qkv.weight": "Q4_K",
            "blk.1.attn_qkv.weight": "Q6_K",
            "position_embd.weight": "F32", "output.weight": "Q8_0" if falcon else "Q6_K"}
    fallback = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
    r = gguf.GGUFReader(tmp_path / "m-q4_k_m.gguf")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    if "output.weight" not in types:
        want["token_embd.weight"] = want.pop("output.weight")
    for t in r.tensors:
        W = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.linalg.norm(W - ref[t.name]) <= 0.1 * np.linalg.norm(ref[t.name]), (name, t.name)
        expect = "F32" if len(t.shape) == 1 else want.get(t.name, "Q4_K")
        if len(t.shape) == 2 and int(t.shape[0]) % 256 and expect in fallback:
            expect = fallback[expect]
        assert types[t.name] == expect, (name, t.name, types[t.name], expect)
    assert "Q4_K" in types.values() and r.fields["general.file_type"].contents() == 15
    # reference: the same blocks decoded by the gguf package into an f32 GGUF (metadata copied): llama.cpp must read
    # our K blocks as gguf does, up to ggml's 8-bit activations in K dot products
    dequantized(tmp_path / "m-q4_k_m.gguf", tmp_path / "m-deq.gguf")
    srvq, srvd, srv16 = (server(tmp_path / f"m-{k}.gguf") for k in ("q4_k_m", "deq", "f16"))
    err = err16 = 0.0
    for prompt in PROMPTS:
        tokens, lps = llama_greedy(srvq, prompt, banned)
        _, lpd = llama_greedy(srvd, prompt, banned)
        _, lp16 = llama_greedy(srv16, prompt, banned)
        assert tokens[0] in lpd[0], (name, prompt)  # the K file's choice is among the copy's top 5
        # log-probabilities of the tokens both top-5 lists hold (the random hidden-256 model is very peaked: a
        # token outside a top 5 has log p far below)
        err = max(err, *(abs(v - lpd[0][i]) for i, v in lps[0].items() if i in lpd[0]))
        err16 = max(err16, *(abs(v - lp16[0][i]) for i, v in lps[0].items() if i in lp16[0]), 0.0)
    print(f"{name} q4_k_m: first-step max |log p| difference vs its gguf-dequantized f32 copy {err:.2e}, "
          f"vs the f16 file {err16:.2e}")
    assert err < 1.0 and err < err16, (name, err, err16)

@pytest.mark.parametrize("name", ["gptoss", "deepseek3"])
def test_moe_q8_0_runs_as_gguf_decodes_it(name, made):
    """q8_0 GGUFs of gpt-oss and DeepSeek (experts and k_b/v_b blocks quantized, biases and sinks f32): llama.cpp
    runs them as it runs the gguf package's decoding of the same blocks written as an f32 GGUF (the first greedy
    token equal, or, where the copy's best two are within 0.1 in log p, the copy's second; log-probabilities of the
    tokens both top-5 lists hold within ggml's 8-bit activations)."""
    d, base, a, _ = made(name)
    banned = banned_of(base)
    export(a, d / "q8.gguf", gguf_type="q8_0")
    dequantized(d / "q8.gguf", d / "q8-deq.gguf")
    q8, deq = server(d / "q8.gguf"), server(d / "q8-deq.gguf")
    err = 0.0
    for prompt in PROMPTS:
        tokens, lps = llama_greedy(deq, prompt, banned)
        tokens_q, lps_q = llama_greedy(q8, prompt, banned)
        gap = lps[0][tokens[0]] - lps[0].get(tokens_q[0], float("-inf"))
        assert tokens_q[0] == tokens[0] or gap < 0.1, (name, prompt, gap)
        err = max(err, *(abs(v - lps_q[0][i]) for i, v in lps[0].items() if i in lps_q[0]))
    print(f"{name} q8_0: first-step max |log p| difference vs its gguf-dequantized f32 copy {err:.2e}")
    assert err < 0.5, (name, err)


def dequantized(src: Path, dst: Path) -> None:
    """A copy of a GGUF file with every tensor dequantized to f32 by the gguf package (metadata as is)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in t.shape[::-1]])
                     .astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# no leading space: llama.cpp's SentencePiece path always adds the dummy prefix, transformers' converted tokenizer
# (Metaspace, prepend_scheme "first") not before a leading space; sentencepiece itself collapses the spaces
TEXTS = ["hello world", "The capital of Veloria is", "two  spaces\nand ü 12345", "x"]


@pytest.mark.parametrize("name, tokenizer", [("llama", "bpe"), ("llama", "sentencepiece"), ("gemma", "sentencepiece"),
                                             ("gpt2", "bpe"), ("gptoss", "o200k")])
def test_text_prompts_tokenize_as_transformers(name, tokenizer, tmp_path):
    """Prompts given to llama.cpp as text (its own tokenizer from our metadata: byte-level BPE with the GPT-2
    pre-tokenizer, or SentencePiece as the `llama` vocabulary, BOS as the tokenizer config says) continue greedily
    as transformers continues its tokenizer's ids of the same text."""
    import shutil

    from test_gguf_archs import sentencepiece_tokenizer

    from test_gguf_bigmoe import o200k_tokenizer

    tok = sentencepiece_tokenizer(tmp_path / "tok") if tokenizer == "sentencepiece" else \
        o200k_tokenizer() if tokenizer == "o200k" else None
    base = build(name, tmp_path / "base", tokenizer=tok)
    if tokenizer == "sentencepiece":
        shutil.copy(tmp_path / "tok" / "tokenizer.model", base / "tokenizer.model")
    a = adapter(name, tmp_path / "a", base)
    export(a, tmp_path / "m.gguf", gguf_type="f32")
    from transformers import AutoTokenizer

    hf_tok, model, banned = AutoTokenizer.from_pretrained(base), peft_merged(base, a), banned_of(base)
    srv = server(tmp_path / "m.gguf")
    for text in TEXTS:
        r = srv.handle_completions({"prompt": text, "max_tokens": 6, "temperature": 0.0, "n_probs": 1,
                                    "ignore_eos": True, "cache_prompt": False,
                                    "logit_bias": [[i, False] for i in banned]})
        ours = [s["id"] for s in r["choices"][0]["logprobs"]["content"]]
        theirs, _ = hf_greedy(model, hf_tok(text).input_ids, banned)
        assert ours == theirs[:len(ours)] and len(ours) == 6, (name, tokenizer, text)
