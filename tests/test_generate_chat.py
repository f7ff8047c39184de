"""`generate` for people: streamed answers, --system, --chat (the conversation kept), --top-p / --top-k /
--repetition-penalty; each checked against transformers' own generate on the same checkpoint."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from qlora_kit.cli.main import main

SYSTEM = "Answer the question briefly."
TURNS = ["hello", "What is the capital of Veloria?", "Paris is in France?"]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from qlora_kit.config import QuantConfig
    from qlora_kit.infer import generate

    return generate.load(str(tiny_model), quant=QuantConfig(type="none"), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model):
    """transformers' model and tokenizer straight from the folder, bf16 as the base loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


def _ref_reply(reference, messages, max_new_tokens, **kw) -> str:
    model, tok = reference
    x = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        y = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    return tok.decode(y[0, x["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_streamed_pieces_make_the_answer(loaded, reference):
    from qlora_kit.infer import generate

    pieces = []
    got = generate.answer(loaded, [TURNS[1]], max_new_tokens=12, on_text=lambda i, t: pieces.append((i, t)))
    assert len(pieces) > 1 and {i for i, _ in pieces} == {0}  # arrived piece by piece
    assert "".join(t for _, t in pieces).strip() == got[0]
    assert got[0] == generate.answer(loaded, [TURNS[1]], max_new_tokens=12)[0]


def test_system_prompt_and_sampling_options_match_transformers(loaded, reference):
    from qlora_kit.infer import generate

    loaded.system_prompt = SYSTEM
    try:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[1]}]
        ids = reference[1].apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert generate.encode(loaded, TURNS[1]) == list(ids)
        assert generate.answer(loaded, [TURNS[1]], max_new_tokens=8)[0] == _ref_reply(reference, msgs, 8)
        penalised = generate.answer(loaded, [TURNS[1]], max_new_tokens=8, repetition_penalty=3.0)[0]
        assert penalised == _ref_reply(reference, msgs, 8, repetition_penalty=3.0)
        # sampling among the single likeliest token is greedy decoding, whatever the seed
        greedy = generate.answer(loaded, [TURNS[1]], max_new_tokens=8)[0]
        assert penalised != greedy  # the penalty reached generate (the tiny model repeats itself without it)
        torch.manual_seed(1)
        assert generate.answer(loaded, [TURNS[1]], max_new_tokens=8, temperature=1.5, top_k=1)[0] == greedy
    finally:
        loaded.system_prompt = None


def test_chat_keeps_the_conversation(loaded, reference):
    from qlora_kit.infer.chat import chat

    lines = iter([TURNS[0], "   ", TURNS[1], "/reset", TURNS[2], "/exit", "never read"])
    out = []
    messages = chat(loaded, lambda: next(lines, None), out.append, max_new_tokens=6, system=SYSTEM)
    # after /reset only the system prompt and the last exchange remain
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == TURNS[2]
    # the two turns before /reset: the second prompt holds the first exchange, as transformers renders it
    history = [{"role": "system", "content": SYSTEM}]
    expected = []
    for turn in TURNS[:2]:
        history.append({"role": "user", "content": turn})
        expected.append(_ref_reply(reference, history, 6))
        history.append({"role": "assistant", "content": expected[-1]})
    expected.append(_ref_reply(reference, [history[0], {"role": "user", "content": TURNS[2]}], 6))
    assert messages[2]["content"] == expected[2]
    text = "".join(out)
    assert "(conversation cleared)" in text
    for e in expected:
        assert e in text


def test_cli_chat_from_stdin(tiny_model, reference, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TURNS[:2]) + "\n"))
    assert main(["generate", str(tiny_model), "--chat", "--system", SYSTEM, "--quant", "none", "--device", "cpu",
                 "--max-new-tokens", "5", "--keep-quantized"]) == 0
    out = capsys.readouterr().out
    history = [{"role": "system", "content": SYSTEM}]
    for turn in TURNS[:2]:
        history.append({"role": "user", "content": turn})
        history.append({"role": "assistant", "content": _ref_reply(reference, history, 5)})
        assert history[-1]["content"] in out


@pytest.mark.parametrize("args, words", [
    (["--prompt", "q", "--top-p", "0.9"], "--temperature is 0"),
    (["--prompt", "q", "--top-k", "5"], "--temperature is 0"),
    (["--chat", "--prompt", "q"], "leave out --prompt"),
    ([], "--prompt TEXT"),
])
def test_generate_refuses_options_that_would_do_nothing(tiny_model, args, words, capsys):
    assert main(["generate", str(tiny_model), *args]) == 2
    assert words in capsys.readouterr().err
