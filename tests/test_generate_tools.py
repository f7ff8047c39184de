"""`generate --tools FILE` (plain and --chat): the tool schemas rendered through the model's chat template as chat
records' tools are in training, checked token for token against apply_chat_template(tools=...); tool calls read back
from what templates write; `/tool NAME JSON` feeds a result into the conversation."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from qlora_kit.cli.main import main
from test_chat_data import CHATML_TOOLS, LLAMA3_TOOLS, WEATHER, _tokenizer

Q = "Weather in Tamsk?"
SYSTEM = "Answer briefly."


@pytest.fixture(scope="module")
def tool_model(tiny_model, tmp_path_factory):
    """The tiny model with a ChatML template that renders tools and tool calls."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(tiny_model, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML_TOOLS
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(tool_model):
    from qlora_kit.config import QuantConfig
    from qlora_kit.infer import generate

    out = generate.load(str(tool_model), quant=QuantConfig(type="none"), device="cpu")
    out.tools = [WEATHER]
    return out


def _template_ids(tok, messages, tools=(WEATHER,)):
    return list(tok.apply_chat_template(messages, tools=list(tools), add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def test_prompt_with_tools_is_the_templates_own_tokens(loaded):
    from qlora_kit.infer import generate

    tok = loaded.tokenizer
    assert generate.encode(loaded, Q) == _template_ids(tok, [{"role": "user", "content": Q}])
    loaded.system_prompt = SYSTEM
    try:
        assert generate.encode(loaded, Q) == _template_ids(tok, [{"role": "system", "content": SYSTEM},
                                                                 {"role": "user", "content": Q}])
    finally:
        loaded.system_prompt = None


def test_chat_feeds_tool_results_back(loaded, monkeypatch):
    """Every turn's prompt is the template's rendering of the conversation so far with the tools; a /tool line
    adds a tool message and the model answers it; malformed /tool lines are explained and change nothing."""
    from qlora_kit.infer import chat, generate

    sent, real = [], generate.reply
    monkeypatch.setattr(generate, "reply", lambda loaded, ids, *a, **k: sent.append(ids) or real(loaded, ids, *a, **k))
    lines = iter([Q, "/tool get_time {}", "/tool get_weather not json", '/tool get_weather {"sky": "clear"}',
                  "/exit"])
    out = []
    messages = chat.chat(loaded, lambda: next(lines, None), out.append, max_new_tokens=4)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[2] == {"role": "tool", "name": "get_weather", "content": '{"sky": "clear"}'}
    assert len(sent) == 2
    assert sent[0] == _template_ids(loaded.tokenizer, messages[:1])
    assert sent[1] == _template_ids(loaded.tokenizer, messages[:3])
    text = "".join(out)
    assert "NAME one of get_weather" in text and "the result must be JSON" in text


@pytest.mark.parametrize("template", [CHATML_TOOLS, LLAMA3_TOOLS], ids=["chatml", "llama3"])
def test_tool_calls_read_back_from_the_templates_rendering(template):
    """The template writes an assistant tool call; reading the calls back from that text and rendering the turn
    again gives the same text (what the chat history keeps is what the template wrote)."""
    from qlora_kit.data.formats import chat_prompt
    from qlora_kit.infer.chat import tool_calls

    tok = _tokenizer(template)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tamsk", "days": [1, 2]}}}
    user = [{"role": "user", "content": Q}]
    prompt = chat_prompt(tok, user, [WEATHER])
    turn = chat_prompt(tok, [*user, {"role": "assistant", "content": "", "tool_calls": [call]}], [WEATHER])
    written = turn[len(prompt):]  # the assistant turn, up to the next turn's header
    text, calls = tool_calls(written)
    assert calls == [call] and text == ""
    again = chat_prompt(tok, [*user, {"role": "assistant", "content": text, "tool_calls": calls}], [WEATHER])
    assert again == turn
    # Llama 3.1's own format: a bare JSON object with "parameters"; Mistral's: a list after [TOOL_CALLS]
    bare = json.dumps({"name": "get_weather", "parameters": {"city": "Tamsk"}})
    assert tool_calls(f"Let me check. {bare}")[1][0]["function"]["arguments"] == {"city": "Tamsk"}
    assert len(tool_calls(f"[{bare}, {bare}]")[1]) == 2 and tool_calls("{not json} [1, 2]")[1] == []


def test_cli_tools(tool_model, tiny_model, tmp_path, monkeypatch, capsys):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    common = ["--quant", "none", "--device", "cpu", "--max-new-tokens", "3", "--keep-quantized"]
    assert main(["generate", str(tool_model), "--tools", str(tools), "--prompt", Q, *common]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(f'{Q}\n/tool get_weather {{"sky": "clear"}}\n'))
    assert main(["generate", str(tool_model), "--tools", str(tools), "--chat", *common]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    for content, words in [("{", "cannot be read as JSON"), ('[{"type": "function"}]', "has no function name")]:
        bad.write_text(content)
        assert main(["generate", str(tool_model), "--tools", str(bad), "--prompt", Q]) == 2
        assert words in capsys.readouterr().err
    # the tiny model's own ChatML template has no tools: the schemas would be dropped, so refused
    assert main(["generate", str(tiny_model), "--tools", str(tools), "--prompt", Q, *common]) == 2
    assert "does not render tools" in capsys.readouterr().err
