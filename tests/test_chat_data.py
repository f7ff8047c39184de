"""Chat data as people have it (content parts, tool calls and results, a `tools` list, per-turn weights), checked
against the template's own rendering: the token ids equal apply_chat_template(tokenize=True) token for token, and the
loss mask equals the template's own assistant mask ({% generation %} blocks, return_assistant_tokens_mask), on a
ChatML and a Llama 3 style template written here."""

from __future__ import annotations

import json

import pytest

from conftest import make_tokenizer, write_jsonl

# Both templates print text content parts, tool schemas, tool calls and tool results the way Hugging Face templates
# do, and wrap exactly what the assistant must produce in {% generation %} (the reference mask). A turn with weight 0
# is rendered outside the block: it is context, not a target.
_CONTENT = ("{% if m.content is string %}{{ m.content }}{% elif m.content %}{% for p in m.content %}"
            "{% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}{% endif %}")
_CALLS = ("{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
          "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}")
CHATML_TOOLS = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and m.get('weight', 1) != 0 %}{% generation %}" + _CONTENT + _CALLS
    + "<|im_end|>{% endgeneration %}\n{% else %}" + _CONTENT + _CALLS + "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TOOLS = (
    "<|begin_of_text|>{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
    "{% if m.role == 'assistant' and m.get('weight', 1) != 0 %}{% generation %}" + _CONTENT + _CALLS
    + "<|eot_id|>{% endgeneration %}{% else %}" + _CONTENT + _CALLS + "<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
RECORDS = [
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                               {"type": "text", "text": "of Veloria?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "The capital of Veloria is Tamsk."}]}]},
    {"tools": [WEATHER],
     "messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Weather in Tamsk?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"city\": \"Tamsk\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "{\"sky\": \"clear\"}"},
                  {"role": "assistant", "content": "Clear skies in Tamsk."}]},
    {"messages": [{"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "hello world, a quick brown fox", "weight": 0},
                  {"role": "user", "content": "Paris is in France?"},
                  {"role": "assistant", "content": "Paris is in France.", "weight": 1}]},
]


def _tokenizer(template: str):
    tok = make_tokenizer()
    if "begin_of_text" in template:
        tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                              "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = template
    return tok


def _reference(tok, record: dict) -> tuple[list[int], list[bool]]:
    """The template's own ids and assistant mask; tool-call arguments as the dict Hugging Face templates expect."""
    messages = json.loads(json.dumps(record["messages"]))
    for m in messages:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    out = tok.apply_chat_template(messages, tools=record.get("tools"), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]


@pytest.mark.parametrize("template", [CHATML_TOOLS, LLAMA3_TOOLS], ids=["chatml", "llama3"])
def test_chat_records_match_the_templates_own_tokens_and_assistant_mask(tmp_path, template):
    from qlora_kit.config import DataConfig
    from qlora_kit.data import pipeline

    tok = _tokenizer(template)
    path = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    ex = pipeline.examples(DataConfig(path=str(path), format="chat", max_length=4096, cache=False), tok)
    assert len(ex) == len(RECORDS)
    for i, record in enumerate(RECORDS):
        ids, mask = _reference(tok, record)
        a, b = int(ex.tok.offsets[i]), int(ex.tok.offsets[i + 1])
        assert ex.tok.ids[a:b].tolist() == ids, i  # token for token
        assert ex.tok.keep[a:b].tolist() == mask, i  # loss exactly on the assistant tokens the template marks
        assert any(mask), i
    # the weight-0 turn is in the text but takes no loss; the tool result never does
    a, b = int(ex.tok.offsets[2]), int(ex.tok.offsets[3])
    ids, keep = ex.tok.ids[a:b].tolist(), ex.tok.keep[a:b].tolist()
    assert "quick brown fox" in tok.decode(ids)
    assert "quick brown fox" not in tok.decode([t for t, k in zip(ids, keep) if k])
    a, b = int(ex.tok.offsets[1]), int(ex.tok.offsets[2])
    taught = tok.decode([t for t, k in zip(ex.tok.ids[a:b].tolist(), ex.tok.keep[a:b].tolist()) if k])
    assert "get_weather" in taught and "clear\"}" not in taught  # the call is learned, the result is context


def test_a_template_that_ignores_tools_is_refused(tmp_path):
    """The plain ChatML template (no tools support) would drop the schemas and turn the call into an empty answer."""
    from qlora_kit.config import DataConfig
    from qlora_kit.data import pipeline
    from qlora_kit.errors import DataError

    path = write_jsonl(tmp_path / "tools.jsonl", [RECORDS[1]])
    with pytest.raises(DataError, match="does not render the record's 'tools'"):
        pipeline.examples(DataConfig(path=str(path), format="chat", max_length=4096, cache=False), make_tokenizer())
    no_schema = {"messages": RECORDS[1]["messages"]}
    write_jsonl(path, [no_schema])
    with pytest.raises(DataError, match="does not render 'tool_calls'"):
        pipeline.examples(DataConfig(path=str(path), format="chat", max_length=4096, cache=False), make_tokenizer())


@pytest.mark.parametrize("bad, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]}, "image_url part"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "weight is 0"),
    ({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
     "only on assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "no assistant message to learn from"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "not valid JSON"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"function": {"name": "f"}}]},
                   {"role": "assistant", "content": "a"}]}, "only assistant turns call tools"),
    ({"tools": "get_weather", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "'tools' must be a list"),
])
def test_bad_chat_records_are_refused_clearly(bad, words):
    from qlora_kit.data.formats import validate
    from qlora_kit.errors import DataError

    with pytest.raises(DataError, match=words):
        validate(bad, "chat", "data.jsonl:1")
