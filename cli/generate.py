"""`qlora-kit generate MODEL|RUN_DIR|ADAPTER_DIR --prompt TEXT [--adapter NAME=PATH ...]`."""

from __future__ import annotations

import json
import sys

import click

from qlora_kit.errors import QloraKitError
from qlora_kit.terms import QUANT_TYPES

BASE, EVERY = "base", "*"  # route names on the command line: the base alone; every adapter and the base


def _parse_adapters(specs: tuple[str, ...]) -> dict[str, str]:
    from qlora_kit.adapters.multi_lora import check_name

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise QloraKitError(f"--adapter {spec!r}: write it as NAME=PATH, e.g. --adapter facts=runs/demo.")
        if check_name(name) in out:
            raise QloraKitError(f"--adapter {name} is given twice; give each adapter its own name.")
        out[name] = path
    return out


def _parse_prompt(prompt: str, names: list[str]) -> tuple[str, str]:
    """'NAME: TEXT' -> (NAME, TEXT): split at the first colon; NAME must be loaded, `base`, or `*`."""
    name, sep, text = prompt.partition(":")
    name, text = name.strip(), text.strip()
    if not sep or name not in [*names, BASE, EVERY] or not text:
        choices = ", ".join([*names, BASE])
        raise QloraKitError(f"--prompt {prompt!r}: with --adapter, start each prompt with the adapter that answers "
                            f"it, as 'NAME: TEXT', NAME one of {choices} (or '*' for all of them).")
    return name, text


def _finite(ctx, param, value: float) -> float:
    import math

    if not math.isfinite(value):  # nan passes FloatRange's comparisons; inf divides every logit to 0
        raise click.BadParameter(f"{value} is not a finite number; 0 is greedy, 0.7-1.0 samples.")
    return value


@click.command()
@click.argument("source")
@click.option("--prompt", "prompts", multiple=True,
              help="A question; repeatable. With --adapter: 'NAME: question', NAME an adapter, 'base' or '*' (all).")
@click.option("--chat", is_flag=True, help="Talk: read user turns from the terminal (or stdin), keep the "
              "conversation, stream each answer. /reset forgets it, /exit or Ctrl-D ends.")
@click.option("--system", help="System prompt (default: the run's data.system_prompt, else the template's own).")
@click.option("--tools", "tools_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="A JSON list of function schemas, rendered by the chat template as in training; tool calls the "
                   "model makes are printed. In --chat, answer one with /tool NAME JSON.")
@click.option("--adapter", "adapter_specs", multiple=True, metavar="NAME=PATH",
              help="Load adapter PATH (run or PEFT adapter folder) as NAME; repeatable: all share one base.")
@click.option("--base", help="Base model for an adapter folder (default: the adapter's base_model_name_or_path).")
@click.option("--quant", type=click.Choice(QUANT_TYPES),
              help="Quantize the base while loading (default: a run's recipe; nf4 under a PEFT adapter folder; "
                   "none for a model folder, e.g. a merged export: it runs as stored, as in eval).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0), callback=_finite,
              help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), help="Sample from the smallest set of tokens "
              "whose probabilities sum to P (needs --temperature > 0).")
@click.option("--top-k", type=click.IntRange(1), help="Sample from the K likeliest tokens (needs --temperature > 0).")
@click.option("--repetition-penalty", type=click.FloatRange(0.0, min_open=True),
              help="Divide the scores of tokens already in the text by this (> 1 repeats less; CTRL's penalty).")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print each answer as it is generated (single model; --adapter and --compare-base print at the "
                   "end).")
@click.option("--raw", is_flag=True, help="Send the prompt text as is, without the chat/alpaca template.")
@click.option("--compare-base", is_flag=True, help="Also answer with the adapter switched off (same quantized base).")
@click.option("--keep-quantized", is_flag=True,
              help="Dequantize per matmul as in training (less memory, slower) instead of once, in fp32.")
@click.option("--decode-dtype", type=click.Choice(["auto", "fp16", "fp32"]), default="auto", show_default=True,
              help="CPU fast path: store the dense weights in fp16 (about 2x the tokens/s; activations rounded to "
                   "fp16 at each matmul) or fp32. auto: fp16 on an AVX-512 CPU.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a base stored only as pickle (.bin); read with torch.load(weights_only=True).")
@click.option("--trust-remote-code", is_flag=True, help="Run model code shipped inside the model folder.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to quantize and decode (auto: CUDA when present).")
def command(source: str, prompts: tuple[str, ...], chat: bool, system: str | None, tools_file: str | None,
            adapter_specs: tuple[str, ...],
            base: str | None, quant: str | None, max_new_tokens: int, temperature: float, top_p: float | None,
            top_k: int | None, repetition_penalty: float | None, stream: bool, raw: bool, compare_base: bool,
            keep_quantized: bool, decode_dtype: str, allow_pickle: bool, trust_remote_code: bool,
            device: str) -> None:
    """Answer prompts with SOURCE: a model folder or built-in name, a run folder (base + its adapter), a PEFT
    adapter folder, or a .gguf model file (qlora-kit's GGUF export). The prompt is wrapped in the same template as
    in training.

    Several adapters over one base, loaded once, answer one mixed batch:

    \b
      qlora-kit generate runs/facts --adapter facts=runs/facts --adapter chat=runs/chat \\
          --prompt "facts: What is the capital of Veloria?" --prompt "chat: Say hello." \\
          --prompt "base: Say hello." --prompt "*: Who wrote The Salt Orchard?"

    With --adapter, SOURCE supplies only the base (a run folder: its model, quantization and template; name its
    own adapter with --adapter too to use it), and every prompt starts with 'NAME:' (split at the first colon):
    an adapter's name, 'base' for no adapter, or '*' for every adapter and the base. All prompts go through ONE
    batched generate call, each row through its own adapter and in the template its run trained with.
    """
    from qlora_kit.infer import generate
    from qlora_kit.config import QuantConfig
    from qlora_kit.typecheck import coerce

    options = {"top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}
    generate.sampling(temperature, **options)  # refused options fail before the model loads
    if chat and (prompts or adapter_specs or compare_base or raw):
        raise QloraKitError("--chat takes its questions from the terminal; leave out --prompt, --adapter, "
                            "--compare-base and --raw.")
    if not chat and not prompts:
        raise QloraKitError("give a question with --prompt TEXT (repeatable), or talk with --chat.")
    for text, where in [*((p, "--prompt") for p in prompts), *([(system, "--system")] if system else [])]:
        coerce(text, str, where)  # a lone surrogate (a bad escape) is refused here, not by the tokenizer mid-run
    if tools_file and raw:
        raise QloraKitError("--tools are rendered by the chat template, which --raw skips; leave out one of them.")
    tools = None
    if tools_file:
        from qlora_kit.infer.chat import load_tools

        tools = load_tools(tools_file)  # a bad file fails before the model loads
    quant_cfg = QuantConfig(type=quant) if quant else None
    if adapter_specs and generate.is_gguf(source):
        raise QloraKitError("--adapter routes prompts between adapters over one quantized base; a GGUF file holds "
                            "one merged model. Pass the base model folder (or a run) as SOURCE instead.")
    if adapter_specs:
        _multi(source, _parse_adapters(adapter_specs), prompts, base, quant_cfg, max_new_tokens, temperature, raw,
               compare_base, allow_pickle, trust_remote_code, keep_quantized, device, decode_dtype, system, options,
               tools)
        return

    from qlora_kit.adapters.methods import disabled
    from qlora_kit.export.gguf import reader

    loaded = generate.load(source, base=base, quant=quant_cfg, device=device, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, read_gguf=reader.load)
    if system is not None:
        loaded.system_prompt = system
    loaded.tools = tools
    if not keep_quantized:
        # adapters switched off for --compare-base stay separate
        generate.speed_up(loaded, merge=not compare_base, dtype=decode_dtype)
    if chat:
        _talk(loaded, max_new_tokens, temperature, options)
        return
    if stream and not compare_base:
        _streamed(loaded, prompts, max_new_tokens, raw, temperature, options)
        return
    answers = generate.answer(loaded, list(prompts), max_new_tokens, raw, temperature, **options)
    if compare_base:
        with disabled(loaded.model):
            base_answers = generate.answer(loaded, list(prompts), max_new_tokens, raw, temperature, **options)
    for i, (prompt, text) in enumerate(zip(prompts, answers)):
        if len(prompts) > 1 or compare_base:
            click.echo(f"> {prompt}")
        if compare_base:
            click.echo(f"  base model : {base_answers[i]}")
            click.echo(f"  fine-tuned : {text}")
        else:
            click.echo(text)
        _show_calls(loaded, text)


def _show_calls(loaded, answer: str) -> None:
    """With --tools: each tool call of the answer on its own line (the JSON the model wrote, whatever its markup)."""
    if loaded.tools:
        from qlora_kit.infer.chat import tool_calls

        for c in tool_calls(answer)[1]:
            click.echo(f"[tool call] {c['function']['name']} {json.dumps(c['function']['arguments'])}")


def _write(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()


def _streamed(loaded, prompts, max_new_tokens, raw, temperature, options) -> None:
    """Each answer printed as it is generated; the leading whitespace a tokenizer puts before the first word is
    dropped, as the unstreamed answer strips it."""
    from qlora_kit.infer import generate

    started = {"answer": False}

    def on_text(_: int, text: str) -> None:
        if not started["answer"]:
            text = text.lstrip()
            started["answer"] = bool(text)
        _write(text)

    for prompt in prompts:
        if len(prompts) > 1:
            click.echo(f"> {prompt}")
        started["answer"] = False
        text = generate.answer(loaded, [prompt], max_new_tokens, raw, temperature, on_text=on_text, **options)[0]
        click.echo()
        _show_calls(loaded, text)


def _talk(loaded, max_new_tokens, temperature, options) -> None:
    from qlora_kit.infer.chat import chat

    stdin = sys.stdin
    tty = stdin.isatty()
    if tty:
        click.echo("chat: type a message; /reset forgets the conversation, /exit or Ctrl-D ends"
                   + ("; /tool NAME JSON answers a tool call." if loaded.tools else "."), err=True)

    def read_line() -> str | None:
        if tty:
            click.echo("you> ", nl=False, err=True)
        line = stdin.readline()
        return line if line else None

    chat(loaded, read_line, _write, max_new_tokens, loaded.system_prompt, temperature, **options)


def _multi(source, adapters, prompts, base, quant_cfg, max_new_tokens, temperature, raw, compare_base, allow_pickle,
           trust_remote_code, keep_quantized=False, device="auto", decode_dtype="auto", system=None,
           options=None, tools=None) -> None:
    """Every prompt routed to its adapter(s); one generate call for the whole batch."""
    from qlora_kit.infer import generate

    names = list(adapters)
    parsed = [_parse_prompt(p, names) for p in prompts]  # checked before the model loads
    rows: list[tuple[int, str | None]] = []  # (prompt index, adapter or None for the base)
    for i, (name, _) in enumerate(parsed):
        wanted = names + [BASE] if name == EVERY else [name] + ([BASE] if compare_base and name != BASE else [])
        rows += [(i, None if n == BASE else n) for n in wanted]
    loaded = generate.load_many(source, adapters, base=base, quant=quant_cfg, device=device, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
    if system is not None:  # every adapter's prompts, and the base's, with this system prompt
        loaded.system_prompt = system
        loaded.formats = {name: (fmt, system) for name, (fmt, _) in loaded.formats.items()}
    loaded.tools = tools
    if not keep_quantized:
        # rows route to different adapters: they stay separate
        generate.speed_up(loaded, merge=False, dtype=decode_dtype)
    answers = generate.answer_routed(loaded, [parsed[i][1] for i, _ in rows], [r for _, r in rows], max_new_tokens,
                                     raw, temperature, **(options or {}))
    width = max(len(BASE), *(len(n) for n in names))
    for i, (name, text) in enumerate(parsed):
        mine = [(r, a) for (j, r), a in zip(rows, answers) if j == i]
        click.echo(f"> {name}: {text}")
        for r, a in mine:
            click.echo(f"  {(r or BASE).ljust(width)} : {a}" if len(mine) > 1 else a)
