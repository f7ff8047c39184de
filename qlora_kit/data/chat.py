"""Chat records as people have them (OpenAI / Hugging Face messages), checked, and rendered through the model's own
chat template with the character spans of the assistant turns that take loss.

A message: {"role": system | user | assistant | tool, "content": str | [{"type": "text", "text": str}, ...] | null,
"tool_calls"?: [{"type": "function", "function": {"name", "arguments"}}] (assistant), "tool_call_id"?, "name"?
(tool), "weight"?: 0 | 1 (assistant: 0 = context only, no loss on that turn)}. A record may carry "tools": the
function schemas the template renders (apply_chat_template(tools=...)).

Text content parts are joined into one string (what a text model's template expects; a list would be printed as
its Python repr by most templates); other parts (images, audio) are refused: qlora-kit trains text models.
Tool-call arguments given as a JSON string (OpenAI's wire format) become a dict, as Hugging Face templates expect
(`arguments | tojson`). The assistant turns' spans cover the tool calls they make: the model learns to call tools;
tool results (role tool) are context, as user turns are.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ..errors import DataError

ROLES = ("system", "user", "assistant", "tool")
Messages = list[dict[str, Any]]


def _text(content: Any, where: str, bad: Callable[[str], DataError]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where} 'content' must be a string or a list of text parts, got {type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            out.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad(f"{where} content[{j}] is a {kind or type(part).__name__!s} part; qlora-kit trains text models, "
                      "so only {\"type\": \"text\", \"text\": \"...\"} parts can be used")
        out.append(part["text"])
    return "".join(out)


def _tool_calls(calls: Any, where: str, bad: Callable[[str], DataError]) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise bad(f"{where} 'tool_calls' must be a non-empty list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{where} tool_calls[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                      f"\"arguments\": ...}}}}, got {call!r:.80}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise bad(f"{where} tool_calls[{j}] arguments are not valid JSON: {args!r:.80}") from None
        if not isinstance(args, dict):
            raise bad(f"{where} tool_calls[{j}] arguments must be a JSON object, got {type(args).__name__}")
        out.append({**{k: v for k, v in call.items() if k != "function"}, "type": call.get("type", "function"),
                    "function": {**fn, "arguments": args}})
    return out


def normalize(record: dict, bad: Callable[[str], DataError]) -> dict:
    """A chat record -> {"messages": [...], "tools"?: [...]} in the shape templates read; `bad(what)` makes the
    DataError for this record."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad("field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{where} must have 'role' in {list(ROLES)}, got {m!r:.80}")
        msg = {"role": m["role"]}
        calls = m.get("tool_calls")
        if m.get("content") is None and calls and m["role"] == "assistant":
            msg["content"] = ""  # a turn that only calls tools: templates read content as a string
        else:
            msg["content"] = _text(m.get("content"), where, bad)
        if calls is not None:
            if m["role"] != "assistant":
                raise bad(f"{where} has 'tool_calls' but role {m['role']!r}; only assistant turns call tools")
            msg["tool_calls"] = _tool_calls(calls, where, bad)
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise bad(f"{where} '{key}' must be a string")
                msg[key] = m[key]
        if "weight" in m:
            if m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], str):
                raise bad(f"{where} has 'weight': {m['weight']!r}; weight is 0 (no loss on this turn) or 1, and only "
                          "on assistant messages (other turns never take loss)")
            msg["weight"] = int(m["weight"])
        out.append(msg)
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise bad("the conversation has no assistant message to learn from (every assistant turn has weight 0, "
                  "or there is none)")
    result: dict = {"messages": out}
    tools = record.get("tools")
    if tools is not None:
        result["tools"] = check_tools(tools, lambda what: bad(f"field 'tools' {what}"))
    return result


def check_tools(tools: Any, bad: Callable[[str], Exception]) -> list[dict]:
    """A tools list as templates read it: function schemas, each {"type": "function", "function": {"name", ...}}
    or the bare {"name", ...}; `bad(what)` makes the error."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise bad("must be a list of function schemas (JSON objects)")
    for j, t in enumerate(tools):
        if not isinstance(tool_name(t), str) or not tool_name(t):
            raise bad(f"[{j}] has no function name: write it as {{\"type\": \"function\", \"function\": "
                      f"{{\"name\": ..., \"parameters\": ...}}}}, got {t!r:.80}")
    return tools


def tool_name(schema: dict) -> Any:
    fn = schema.get("function")
    return fn.get("name") if isinstance(fn, dict) else schema.get("name")


def apply(tokenizer: Any, messages: Messages, gen: bool, place: str, tools: list | None = None) -> str:
    """The template's text for `messages` (`gen`: ending with the assistant's turn header)."""
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
    except Exception as e:  # a template is code shipped with the model: any failure means it rejects this record
        raise DataError(f"{place}: the tokenizer's chat template rejected this conversation: {e}") from None


def _check_rendered(tokenizer: Any, messages: Messages, tools: list | None, full: str, place: str) -> None:
    """A template that ignores `tools` or `tool_calls` would train on turns that lost their calls (an empty
    assistant turn taking loss): refused. Found by rendering without them and comparing."""
    if tools and apply(tokenizer, messages, False, place) == full:
        raise DataError(f"{place}: the model's chat template does not render the record's 'tools' (it ignores them), "
                        "so the model would never see the tool schemas. Use a model whose template supports tool "
                        "calling, or drop the 'tools' field.")
    if any("tool_calls" in m for m in messages):
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if apply(tokenizer, bare, False, place, tools) == full:
            raise DataError(f"{place}: the model's chat template does not render 'tool_calls' (it ignores them), so "
                            "the assistant turns that call tools would train as empty answers. Use a model whose "
                            "template supports tool calling, or leave those records out.")


def render(tokenizer: Any, messages: Messages, tools: list | None, assistant_turns: str,
           place: str) -> tuple[str, list[tuple[int, int]]]:
    """(full text, character spans that take loss): assistant turn i's span runs from the end of
    render(turns < i, add_generation_prompt=True) to the end of render(turns <= i), minus trailing whitespace;
    turns with weight 0 take none; `assistant_turns` last: only the final weighted turn does."""
    full = apply(tokenizer, messages, False, place, tools)
    _check_rendered(tokenizer, messages, tools, full, place)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1)]
    if assistant_turns == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        prompt = apply(tokenizer, messages[:i], True, place, tools)
        turn = apply(tokenizer, messages[: i + 1], False, place, tools)
        if not (full.startswith(turn) and turn.startswith(prompt)):
            raise DataError(
                f"{place}: the chat template renders turn {i} differently once later turns follow, so the loss "
                "span of that turn cannot be found. Split the conversation into one record per assistant turn, "
                "or set data.assistant_turns=last."
            )
        spans.append((len(prompt), len(prompt) + len(turn[len(prompt):].rstrip())))
    return full, spans
