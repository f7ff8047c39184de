"""`generate --chat`: a conversation kept turn by turn, each prompt rendered by the model's own chat template (as
chat data is in training: data/chat.py), each answer streamed as it is generated.

Lines typed are user turns; `/reset` forgets the conversation (the system prompt stays), `/exit` or end of input
ends it. The whole history is sent every turn: nothing is cut, so a long chat grows towards the model's context.
"""

from __future__ import annotations

from typing import Callable

from . import generate
from ..data.chat import apply
from ..data.formats import has_template
from ..errors import ModelError

EXIT, RESET = ("/exit", "/quit"), "/reset"


def prompt_ids(loaded: generate.Loaded, messages: list[dict]) -> list[int]:
    """The conversation so far, ending in the assistant's header, as token ids (the template writes BOS itself)."""
    return loaded.tokenizer(apply(loaded.tokenizer, messages, True, "chat"), add_special_tokens=False)["input_ids"]


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
        messages.append({"role": "user", "content": line})
        answer = generate.reply(loaded, prompt_ids(loaded, messages), max_new_tokens, kwargs, write)
        write("\n")
        messages.append({"role": "assistant", "content": answer})
    return messages
