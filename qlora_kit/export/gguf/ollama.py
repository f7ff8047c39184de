"""The Ollama `Modelfile` written beside a merged GGUF, so `ollama create NAME -f NAME.Modelfile` answers in the
format the model was trained on.

Ollama prompts with a Go template, not the Jinja chat template the GGUF carries, so the prompt format is
translated: the chat template's family (ChatML, Llama 3, Gemma, Mistral/Llama 2 [INST], Phi-3, Command-R, Granite,
gpt-oss harmony; recognised by its turn markers) when the run trained through the chat template (chat
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

GEMMA = ('{{- if .System }}<start_of_turn>user\n{{ .System }}<end_of_turn>\n{{ end }}'
         '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
         '{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n')
INST = ('{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}[INST] {{ if and $.System (eq $i 0) }}{{ $.System }}'
        '\n\n{{ end }}{{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}')
PHI3 = ('{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}'
        '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n')
COMMAND_R = ('{{- if .System }}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{ .System }}<|END_OF_TURN_TOKEN|>{{ end }}'
             '{{- range .Messages }}<|START_OF_TURN_TOKEN|>{{ if eq .Role "assistant" }}<|CHATBOT_TOKEN|>{{ else }}'
             '<|USER_TOKEN|>{{ end }}{{ .Content }}<|END_OF_TURN_TOKEN|>{{ end }}'
             '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>')
GRANITE = ('{{- if .System }}<|start_of_role|>system<|end_of_role|>{{ .System }}<|end_of_text|>\n{{ end }}'
           '{{- range .Messages }}<|start_of_role|>{{ .Role }}<|end_of_role|>{{ .Content }}<|end_of_text|>\n{{ end }}'
           '<|start_of_role|>assistant<|end_of_role|>')
# gpt-oss's harmony format as its chat template renders a conversation without tools: the fixed system message
# (model identity, knowledge cutoff, the date through Ollama's currentDate, reasoning effort medium, the channels),
# the system prompt as the developer message's instructions, past assistant turns on the final channel. The model
# answers on its channels and ends the turn with <|return|> (<|call|> for a tool call).
HARMONY = ('<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n'
           'Knowledge cutoff: 2024-06\nCurrent date: {{ currentDate }}\n\nReasoning: medium\n\n'
           '# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>'
           '{{- if .System }}<|start|>developer<|message|># Instructions\n\n{{ .System }}\n\n<|end|>{{ end }}'
           '{{- range .Messages }}{{ if eq .Role "assistant" }}<|start|>assistant<|channel|>final<|message|>'
           '{{ .Content }}<|end|>{{ else if eq .Role "user" }}<|start|>user<|message|>{{ .Content }}<|end|>{{ end }}'
           '{{ end }}<|start|>assistant')
# marker in the Jinja chat template -> (Ollama TEMPLATE, its stop strings); the first match wins
FAMILIES = [
    ("<|channel|>", HARMONY, ("<|return|>", "<|call|>")),
    ("<|im_start|>", CHATML, ("<|im_end|>", "<|im_start|>")),
    ("<|start_header_id|>", LLAMA3, ("<|eot_id|>",)),
    ("<start_of_turn>", GEMMA, ("<end_of_turn>",)),
    ("<|START_OF_TURN_TOKEN|>", COMMAND_R, ("<|END_OF_TURN_TOKEN|>",)),
    ("<|start_of_role|>", GRANITE, ("<|end_of_text|>", "<|start_of_role|>")),
    ("<|assistant|>", PHI3, ("<|end|>", "<|user|>")),
    ("[INST]", INST, ("[INST]", "</s>")),
]


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
    for marker, template, stops in FAMILIES:
        if marker in chat:
            baked = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", chat, re.S) if template is CHATML else None
            return template, sorted(set(stop) | set(stops)), system or (baked and baked.group(1))
    return None, stop, system


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(gguf_name: str, tok: dict[str, Any], recipe=None) -> str:
    template, stop, system = prompt_format(tok, recipe)
    lines = [f"# Ollama: ollama create NAME -f {Path(gguf_name).stem}.Modelfile", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    else:
        lines.append("# no TEMPLATE: the chat template is not one this exporter translates (ChatML, Llama 3, Gemma, "
                     "[INST], Phi-3, Command-R, Granite, harmony); Ollama uses the GGUF's own tokenizer.chat_template")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    return "\n".join(lines) + "\n"
