"""The Ollama `Modelfile` written beside a merged GGUF, so `ollama create NAME -f NAME.Modelfile` answers in the
format the model was trained on.

Ollama prompts with a Go template, not the Jinja chat template the GGUF carries, so the prompt format is
translated: the chat template's family (ChatML, Llama 3) when the run trained through the chat template (chat
data, or alpaca data on a tokenizer with a template, see data.render_prompt); the Stanford Alpaca prompt for an
alpaca run without one; the bare text for a text run. A default system prompt baked into a ChatML template (SmolLM2
has one) becomes SYSTEM. The stop tokens are the end-of-turn tokens of that format plus the tokenizer's EOS. An
unrecognised chat template gets no TEMPLATE line: Ollama then reads the GGUF's own template if it knows it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
LLAMA3 = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
          '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
          '<|start_header_id|>assistant<|end_header_id|>\n\n')


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(f"{gguf_path.stem}.Modelfile")


def _alpaca_template() -> str:
    from ...data.formats import ALPACA_HEAD, ALPACA_TAIL

    return ("{{ if .System }}{{ .System }}{{ else }}" + ALPACA_HEAD + ALPACA_TAIL + "{{ end }}\n\n"
            "### Instruction:\n{{ .Prompt }}\n\n### Response:\n")


def prompt_format(tok: dict[str, Any], recipe=None) -> tuple[str | None, list[str], str | None]:
    """(TEMPLATE or None, stop strings, SYSTEM or None) for a tokenizer summary from gguf_vocab.add_tokenizer."""
    from ...data.formats import prompt_format as asked_as

    fmt = asked_as(recipe.data.format) if recipe is not None else "chat"
    system = recipe.data.system_prompt if recipe is not None else None
    chat = tok.get("chat_template")
    stop = list(tok.get("stop") or [])
    if fmt == "text" or (fmt == "alpaca" and not chat):
        if fmt == "text":
            return "{{ .Prompt }}", stop, None
        return _alpaca_template(), stop, system
    if not chat:
        return None, stop, system
    if "<|im_start|>" in chat:
        baked = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", chat, re.S)
        return CHATML, sorted(set(stop) | {"<|im_end|>", "<|im_start|>"}), system or (baked and baked.group(1))
    if "<|start_header_id|>" in chat:
        return LLAMA3, sorted(set(stop) | {"<|eot_id|>"}), system
    return None, stop, system


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(gguf_name: str, tok: dict[str, Any], recipe=None) -> str:
    template, stop, system = prompt_format(tok, recipe)
    lines = [f"# Ollama: ollama create NAME -f {Path(gguf_name).stem}.Modelfile", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    else:
        lines.append("# no TEMPLATE: the chat template is not one this exporter translates; Ollama uses the GGUF's")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    return "\n".join(lines) + "\n"
