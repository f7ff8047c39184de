"""`generate --chat`: a conversation kept turn by turn, each prompt rendered by the model's own chat template (as
chat data is in training: data/chat.py), each answer streamed as it is generated.

Lines typed are user turns; `/reset` forgets the conversation (the system prompt stays), `/exit` or end of input
ends it. The whole history is sent every turn: nothing is cut, so a long chat grows towards the model's context.

Tools (`--tools FILE`, a JSON list of function schemas): rendered by the template on every turn, as a chat record's
`tools` are in training. A tool call the model writes (a JSON object with "name" and "arguments" or "parameters",
whatever markup the template wraps it in) is printed and kept in the history as the assistant's `tool_calls`, which
the template renders as training data's calls are; `/tool NAME JSON` answers it with a tool message (role tool)
and lets the model go on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from . import generate
from ..data.chat import check_tools, tool_name
from ..data.formats import chat_prompt, has_template
from ..errors import ConfigError, ModelError

EXIT, RESET, TOOL = ("/exit", "/quit"), "/reset", "/tool"


def load_tools(path: str | Path) -> list[dict]:
    """--tools FILE: a JSON list of function schemas (OpenAI / Hugging Face `tools`)."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tools {path} cannot be read as JSON ({e}); give a file holding a JSON list of "
                          "function schemas.") from None
    return check_tools(tools, lambda what: ConfigError(f"--tools {path}: the JSON {what}."))


def prompt_ids(loaded: generate.Loaded, messages: list[dict]) -> list[int]:
    """The conversation so far, ending in the assistant's header, as token ids (the template writes BOS itself)."""
    text = chat_prompt(loaded.tokenizer, messages, loaded.tools)
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text before the first call, the calls) of a model's answer: every JSON object (or list of them) with a
    "name" and "arguments" (or Llama 3's "parameters") object, as {"type": "function", "function": {...}}."""
    decoder, calls, first, i = json.JSONDecoder(), [], None, 0
    while (m := re.compile(r"[\[{]").search(text, i)) is not None:
        try:
            value, end = decoder.raw_decode(text, m.start())
        except ValueError:
            i = m.start() + 1
            continue
        found = [c for c in (value if isinstance(value, list) else [value]) if _is_call(c)]
        if found:
            first = m.start() if first is None else first
            calls += [{"type": "function", "function": {"name": c["name"],
                                                        "arguments": c.get("arguments", c.get("parameters"))}}
                      for c in found]
        i = end if found else m.start() + 1
    if first is None:
        return text, []
    return re.sub(r"<[^<>\s]*>\s*$", "", text[:first]).strip(), calls  # a wrapper tag before the call is markup


def _is_call(c) -> bool:
    args = c.get("arguments", c.get("parameters")) if isinstance(c, dict) else None
    return isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(args, dict)


def tool_message(line: str, tools: list[dict] | None) -> dict:
    """`/tool NAME JSON` -> the tool result message; ConfigError (shown, the chat goes on) when it is malformed."""
    name, _, result = line[len(TOOL):].strip().partition(" ")
    names = [tool_name(t) for t in tools or []]
    if not tools:
        raise ConfigError("/tool answers a tool call, and no tools were given; start with --tools FILE.")
    if name not in names:
        raise ConfigError(f"/tool {name or '?'}: write /tool NAME JSON, NAME one of {', '.join(names)}.")
    try:
        json.loads(result)
    except ValueError:
        raise ConfigError(f"/tool {name}: the result must be JSON, e.g. /tool {name} {{\"temperature\": 21}}; "
                          f"got {result.strip() or 'nothing'!r:.80}.") from None
    return {"role": "tool", "name": name, "content": result.strip()}


def chat(loaded: generate.Loaded, read_line: Callable[[], str | None], write: Callable[[str], None],
         max_new_tokens: int = 256, system: str | None = None, temperature: float = 0.0, **options) -> list[dict]:
    """Talk until `read_line` returns None or /exit; -> the conversation (messages). `write` receives the streamed
    answers (and a newline after each)."""
    if not has_template(loaded.tokenizer):
        raise ModelError("--chat needs a chat template, and this model's tokenizer has none (a base model, not an "
                         "instruct one); ask single questions with --prompt instead.")
    kwargs = generate.sampling(temperature, **options)
    head = [{"role": "system", "content": system}] if system else []
    messages = list(head)
    while True:
        line = read_line()
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line in EXIT:
            break
        if line == RESET:
            messages = list(head)
            write("(conversation cleared)\n")
            continue
        if line == TOOL or line.startswith(TOOL + " "):
            try:
                messages.append(tool_message(line, loaded.tools))
            except ConfigError as e:
                write(f"({e})\n")
                continue
        else:
            messages.append({"role": "user", "content": line})
        answer = generate.reply(loaded, prompt_ids(loaded, messages), max_new_tokens, kwargs, write)
        write("\n")
        text, calls = tool_calls(answer) if loaded.tools else (answer, [])
        for c in calls:
            write(f"[tool call] {c['function']['name']} {json.dumps(c['function']['arguments'])}\n")
        if calls:
            write(f"(answer with {TOOL} NAME JSON)\n")
        messages.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
    return messages
