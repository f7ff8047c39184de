"""`qlora-kit inspect PATH`: what is this folder or file (model, adapter, run, quantized export, GGUF)."""

from __future__ import annotations

import json

import click


def _fmt(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin (pickle) weights, with torch.load(weights_only=True).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped inside the folder.")
def command(path: str, as_json: bool, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Describe PATH: a model folder (or Hub id, or built-in name), a PEFT adapter folder (LoRA, DoRA, IA3 or a
    stack), a run folder, a quantized export (bitsandbytes 4/8-bit) or a GGUF file (model or LoRA adapter)."""
    from qlora_kit.analysis.inspect import describe

    info = describe(path, allow_pickle, trust_remote_code)
    if as_json:
        click.echo(json.dumps(info))
        return
    for k, v in info.items():
        click.echo(f"{k:>16}: {_fmt(v)}")
