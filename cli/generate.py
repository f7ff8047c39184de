"""`qlora-kit generate MODEL|RUN_DIR|ADAPTER_DIR --prompt TEXT`."""

from __future__ import annotations

import click

QUANTS = ["nf4", "fp4", "int8", "none"]


@click.command()
@click.argument("source")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A question; repeatable.")
@click.option("--base", help="Base model for an adapter folder (default: the adapter's base_model_name_or_path).")
@click.option("--quant", type=click.Choice(QUANTS), help="Quantization of the base (default: the run's; nf4 otherwise).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0), help="0: greedy.")
@click.option("--raw", is_flag=True, help="Send the prompt text as is, without the chat/alpaca template.")
@click.option("--compare-base", is_flag=True, help="Also answer with the adapter switched off (same quantized base).")
@click.option("--allow-pickle", is_flag=True,
              help="Accept a base stored only as pickle (.bin); read with torch.load(weights_only=True).")
@click.option("--trust-remote-code", is_flag=True, help="Run model code shipped inside the model folder.")
def command(source: str, prompts: tuple[str, ...], base: str | None, quant: str | None, max_new_tokens: int,
            temperature: float, raw: bool, compare_base: bool, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Answer prompts with SOURCE: a model folder or built-in name, a run folder (base + its adapter), or a PEFT
    adapter folder. The prompt is wrapped in the same template as in training."""
    from qlora_kit import generate
    from qlora_kit.config import QuantConfig

    from qlora_kit.lora import disabled

    loaded = generate.load(source, base=base, quant=QuantConfig(type=quant) if quant else None,
                           allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    answers = generate.answer(loaded, list(prompts), max_new_tokens, raw, temperature)
    if compare_base:
        with disabled(loaded.model):
            base_answers = generate.answer(loaded, list(prompts), max_new_tokens, raw, temperature)
    for i, (prompt, text) in enumerate(zip(prompts, answers)):
        if len(prompts) > 1 or compare_base:
            click.echo(f"> {prompt}")
        if compare_base:
            click.echo(f"  base model : {base_answers[i]}")
            click.echo(f"  fine-tuned : {text}")
        else:
            click.echo(text)
