"""The tokenizers GGUF export writes, checked by llama.cpp itself (the xllamacpp wheel; skipped without the
`llama-cpp` extra): text given to llama.cpp is split by its regexes for the pre-tokenizer name we write, and must come
out as the tokens transformers' tokenizer makes of it (prompt length, first-step log-probability and greedy
continuation of the merged model all equal); SentencePiece's dummy-prefix space, where llama.cpp and transformers
differ, is pinned down exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_models import MIXED, adapter, bpe_tokenizer, build, peft_merged, pre_tokenizers
from qlora_kit.export import formats as ex

xlc = pytest.importorskip("xllamacpp", reason="llama.cpp runtime not installed: pip install 'qlora-kit[llama-cpp]'")
gguf = pytest.importorskip("gguf")
from test_llama_cpp import hf_greedy, server  # noqa: E402  (after the skip: it imports xllamacpp)


def export(src, out: Path) -> Path:
    ex.export(src, ex.Options(out=out, progress=False, merge_base="original", format="gguf", gguf_type="f32"))
    return out


@pytest.mark.parametrize("pre", list(pre_tokenizers()))
def test_llama_cpp_splits_text_as_the_tokenizer(pre, tmp_path):
    """Mixed text (digits, punctuation, whitespace runs, tabs, non-ASCII, CamelCase): llama.cpp's prompt is as many
    tokens as transformers' ids, and from it the merged model's first log-probability and 4 greedy tokens are
    transformers' (a different split would give another context)."""
    tok = bpe_tokenizer(pre)
    base = build("llama", tmp_path / "base", tokenizer=tok)
    a = adapter("llama", tmp_path / "a", base)
    path = export(a, tmp_path / "m.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    model, srv = peft_merged(base, a), server(path)
    banned = [i for i in range(len(tok)) if i in tok.all_special_ids or "\ufffd" in tok.decode([i])]
    for text in MIXED:
        ids = tok(text).input_ids
        r = srv.handle_completions({"prompt": text, "max_tokens": 4, "temperature": 0.0, "n_probs": 1,
                                    "ignore_eos": True, "cache_prompt": False,
                                    "logit_bias": [[i, False] for i in banned]})
        steps = r["choices"][0]["logprobs"]["content"]
        theirs, logprobs = hf_greedy(model, ids, banned)
        assert r["usage"]["prompt_tokens"] == len(ids), (pre, text)
        assert [s["id"] for s in steps] == theirs[:4], (pre, text)
        assert steps[0]["logprob"] == pytest.approx(float(logprobs[0][theirs[0]]), abs=1e-2), (pre, text)


def test_sentencepiece_dummy_prefix_differs_from_transformers_exactly_so(tmp_path):
    """The SentencePiece leading-space difference, found: llama.cpp (add_space_prefix true, as the model adds
    "\u2581" before "a") puts the dummy-prefix space before the text and again after every special token, whatever
    follows; transformers' converted tokenizer (Metaspace, prepend_scheme "first") only at the very start, and not
    when the text already begins with a space. No GGUF key says "first", so llama.cpp's tokens of TEXT are
    transformers' tokens of TEXT with a space put at its start and after each special token: equal for ordinary
    prompts, one token more for one that starts with a space or has text right after a special token."""
    import shutil

    from transformers import AutoTokenizer

    from test_gguf_archs import sentencepiece_tokenizer

    sentencepiece_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    base = build("llama", tmp_path / "base", tokenizer=tok)
    shutil.copy(tmp_path / "tok" / "tokenizer.model", base / "tokenizer.model")
    a = adapter("llama", tmp_path / "a", base)
    path = export(a, tmp_path / "m.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.add_space_prefix"].contents() is True
    model, srv = peft_merged(base, a), server(path)
    banned = [i for i in range(len(tok)) if i in tok.all_special_ids or "\ufffd" in tok.decode([i])]
    for text, spaced in [("hello world", "hello world"), (" hello world", "  hello world"),
                         ("  two  spaces", "   two  spaces"), ("a</s>b", "a</s> b"), ("x", "x")]:
        r = srv.handle_completions({"prompt": text, "max_tokens": 1, "temperature": 0.0, "n_probs": 1,
                                    "ignore_eos": True, "cache_prompt": False,
                                    "logit_bias": [[i, False] for i in banned]})
        ids = tok(spaced).input_ids
        theirs, logprobs = hf_greedy(model, ids, banned)
        step = r["choices"][0]["logprobs"]["content"][0]
        assert r["usage"]["prompt_tokens"] == len(ids), text
        assert len(ids) == len(tok(text).input_ids) + (text != spaced), text
        assert step["id"] == theirs[0] and step["logprob"] == pytest.approx(float(logprobs[0][theirs[0]]), abs=1e-2)
