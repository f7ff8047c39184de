"""Data shapes: validate a record, and render it to ONE string plus the character spans that take loss.

Shapes (`data.format`):
  text        {"text"}                                    loss on every token, EOS appended
  alpaca      {"instruction", "input"?, "output"}         loss on the response (and its end-of-turn / EOS)
  chat        {"messages": [{"role", "content"}]}         OpenAI messages; loss on assistant turns; content parts,
                                                          tool calls, a `tools` list, per-turn `weight` (chat.py)
  sharegpt    {"conversations": [{"from", "value"}]}      from: human/user -> user, gpt/assistant -> assistant,
                                                          system -> system; then exactly as chat
  completion  {"prompt", "completion"}                    plain text, no template; loss on the completion + EOS

Chat templates: assistant turn i's span runs from the end of render(turns < i, add_generation_prompt=True) to the end
of render(turns <= i), minus trailing whitespace (ChatML's "\\n" after <|im_end|>: the model stops at the marker).
`data.assistant_turns: last` keeps only the final assistant turn's span (earlier answers become context).
A null optional field (alpaca's `input`, as Parquet/CSV write an empty cell) counts as absent.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from . import chat

ALPACA_HEAD = "Below is an instruction that describes a task. "
ALPACA_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
)
ALPACA_TAIL = "Write a response that appropriately completes the request."
FORMAT_HELP = {
    "text": '{"text": "..."}',
    "alpaca": '{"instruction": "...", "input": "..." (optional), "output": "..."}',
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "completion": '{"prompt": "...", "completion": "..."}',
    "preference": '{"prompt": "...", "chosen": "...", "rejected": "..."}',
}
REQUIRED = {"text": ("text",), "alpaca": ("instruction", "output"), "chat": ("messages",),
            "sharegpt": ("conversations",), "completion": ("prompt", "completion"), "preference": ()}
OPTIONAL = {"alpaca": ("input",), "preference": ("prompt", "chosen", "rejected", "completion", "label")}
_STRINGS = {"text": ("text",), "alpaca": ("instruction", "input", "output"), "completion": ("prompt", "completion")}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no UTF-8 encoding exists

Record = dict[str, Any]
Messages = list[dict[str, str]]


def fields(fmt: str) -> tuple[str, ...]:
    """Every field the shape reads (what data.columns may map)."""
    return REQUIRED[fmt] + OPTIONAL.get(fmt, ())


def validate(record: Any, fmt: str, place: str) -> Record:
    """Check one record; -> the record in canonical form (sharegpt becomes {"messages": ...}; null optionals dropped).
    DataError names `place` (file and line, or row), says what is wrong and what the shape needs."""

    def bad(what: str) -> DataError:
        return DataError(f"{place}: {what}; the {fmt} format needs {FORMAT_HELP[fmt]}. Fix the record, map your "
                         "columns with data.columns, or set data.format.")

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, got {type(record).__name__}")
    record = {k: v for k, v in record.items() if not (v is None and k in OPTIONAL.get(fmt, ()))}
    for key in REQUIRED[fmt]:
        if key not in record:
            raise bad(f"missing field '{key}' (found: {', '.join(map(str, record)) or 'no fields'})")
    for key in _STRINGS.get(fmt, ()):
        if key in record and not isinstance(record[key], str):
            raise bad(f"field '{key}' must be a string, got {type(record[key]).__name__}")
    if fmt == "sharegpt":
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise bad("field 'conversations' must be a non-empty list")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                raise bad(f"conversations[{i}] must have a string 'value', got {t!r:.80}")
            if t.get("from") not in SHAREGPT_ROLES:
                raise DataError(
                    f"{place}: conversations[{i}] has 'from': {t.get('from')!r}, which is not a ShareGPT speaker "
                    f"qlora-kit knows ({', '.join(SHAREGPT_ROLES)}). Rename it in the data, or drop that turn.")
            messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
        record, fmt = {"messages": messages}, "chat"
    if fmt == "chat":  # content parts, tool calls, tools, per-turn weights: chat.py
        record = chat.normalize(record, bad)
    texts = [record[k] for k in _STRINGS.get(fmt, ()) if k in record]
    texts += [m["content"] for m in record.get("messages", ())] if fmt == "chat" else []
    if any(_SURROGATE.search(t) for t in texts):  # JSON allows "\\ud800"; tokenizers raise a TypeError on it
        raise bad("a string holds a lone surrogate escape such as \\ud800, which is not valid unicode text")
    return record


def has_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def templated(tokenizer: Any, fmt: str) -> bool:
    """Whether the text comes from the chat template (which writes BOS itself when its model wants one)."""
    return fmt in ("chat", "sharegpt") or (fmt == "alpaca" and has_template(tokenizer))


def _chat(tokenizer: Any, messages: Messages, gen: bool, place: str, tools: list | None = None) -> str:
    return chat.apply(tokenizer, messages, gen, place, tools)


def _alpaca_messages(record: Record, system_prompt: str | None) -> Messages:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return system + [{"role": "user", "content": user}]


def _alpaca_plain(record: Record, system_prompt: str | None) -> str:
    """The classic Stanford Alpaca prompt; a system_prompt, if given, replaces the preamble (it plays that role)."""
    extra = f"\n\n### Input:\n{record['input']}" if record.get("input") else ""
    head = system_prompt if system_prompt is not None else (ALPACA_HEAD_INPUT if extra else ALPACA_HEAD) + ALPACA_TAIL
    return f"{head}\n\n### Instruction:\n{record['instruction']}{extra}\n\n### Response:\n"


def _with_system(messages: Messages, system_prompt: str | None) -> Messages:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages  # a record's own system message wins over the recipe's default
    return [{"role": "system", "content": system_prompt}] + messages


def prompt_format(fmt: str) -> str:
    """The format a question to the trained model is rendered in: preference data's string prompts are rendered as
    alpaca renders an instruction (data_preference), so a preference-tuned model is asked as an alpaca one."""
    return "alpaca" if fmt == "preference" else fmt


def render_prompt(record_or_question: str | Record, tokenizer: Any, fmt: str, system_prompt: str | None = None,
                  tools: list | None = None) -> str:
    """The text the model sees before its answer, exactly as in training (for generation after training).

    A string is a question (alpaca: the instruction; chat/sharegpt: one user message; completion/text: the prompt);
    for a chat record, the prompt is the conversation before its last assistant turn. `tools`: function schemas the
    chat template renders, as chat records' `tools` are in training (a template that ignores them is refused)."""
    q, fmt = record_or_question, prompt_format(fmt)
    if tools and (fmt in ("text", "completion") or not has_template(tokenizer)):
        raise DataError(f"tools are rendered by a chat template, and this {fmt} model "
                        f"{'has none' if not has_template(tokenizer) else 'is prompted without one'}; "
                        "leave out --tools, or use a run trained on chat data with a template that renders tools.")
    if fmt == "alpaca" and not isinstance(q, (str, dict)):
        raise DataError("a prompt for a preference-tuned model must be a string question.")
    if fmt not in FORMAT_HELP:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMAT_HELP)}.")
    if fmt in ("text", "completion"):
        return q if isinstance(q, str) else q["text" if fmt == "text" else "prompt"]
    if fmt == "alpaca":
        record = {"instruction": q} if isinstance(q, str) else q
        if has_template(tokenizer):
            return chat_prompt(tokenizer, _alpaca_messages(record, system_prompt), tools)
        return _alpaca_plain(record, system_prompt)
    if not has_template(tokenizer):
        raise DataError(f"data.format is {fmt} but the tokenizer has no chat template; use format alpaca or text.")
    messages = [{"role": "user", "content": q}] if isinstance(q, str) else validate(q, fmt, "prompt")["messages"]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return chat_prompt(tokenizer, _with_system(messages, system_prompt), tools)


def chat_prompt(tokenizer: Any, messages: Messages, tools: list | None) -> str:
    """The generation prompt of `messages`, with `tools` rendered; refused when the template ignores them."""
    text = _chat(tokenizer, messages, True, "prompt", tools)
    if tools and text == _chat(tokenizer, messages, True, "prompt"):
        raise DataError("the model's chat template does not render tools (the prompt is the same without them), so "
                        "the model would never see the schemas; leave out --tools, or use a model whose template "
                        "supports tool calling.")
    return text


def render(record: Record, tokenizer: Any, cfg: DataConfig, place: str) -> tuple[str, list[tuple[int, int]]]:
    """A validated (canonical) record -> (full text, character spans that take loss)."""
    if cfg.format == "text":
        return record["text"], [(0, len(record["text"]))]
    if cfg.format == "completion":
        return record["prompt"] + record["completion"], [(len(record["prompt"]), len(record["prompt"])
                                                          + len(record["completion"]))]
    if cfg.format == "alpaca" and not has_template(tokenizer):
        prompt = _alpaca_plain(record, cfg.system_prompt)
        return prompt + record["output"], [(len(prompt), len(prompt) + len(record["output"]))]
    if cfg.format == "alpaca":
        messages = _alpaca_messages(record, cfg.system_prompt) + [{"role": "assistant", "content": record["output"]}]
    elif not has_template(tokenizer):
        raise DataError(f"{place}: data.format is {cfg.format} but the tokenizer has no chat template; use alpaca "
                        "or text.")
    else:
        messages = _with_system(record["messages"], cfg.system_prompt)
    return chat.render(tokenizer, messages, record.get("tools"), cfg.assistant_turns, place)
