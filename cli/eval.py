"""`qlora-kit eval SOURCE --data FILE`: mean loss per token and perplexity (qlora_kit.infer.evaluation)."""

from __future__ import annotations

import json
import typing

import click

from qlora_kit.config import DataFormat
from qlora_kit.terms import QUANT_TYPES


@click.command()
@click.argument("source")
@click.option("--data", "data_path", metavar="FILE|NAME",
              help="A data file or folder as data.path reads (.jsonl/.json/.csv/.parquet/...), or pydoc-heldout / "
                   "pydoc-train (Python's own docs, offline). "
                   "Default for a run: its own validation split.")
@click.option("--format", "fmt", type=click.Choice(typing.get_args(DataFormat)),  # every format train reads
              help="Data format (default: the run's data.format, else text).")
@click.option("--objective", type=click.Choice(["dpo", "ipo", "orpo", "kto", "simpo"]),
              help="Preference data: the loss to report (default: the run's train.objective, else dpo).")
@click.option("--beta", type=click.FloatRange(0, min_open=True),
              help="Preference data: the objective's beta (default: the run's train.beta, else 0.1).")
@click.option("--all-tokens", is_flag=True, help="Loss on every token, prompts included (default: as training).")
@click.option("--max-length", type=click.IntRange(2), help="Tokens per example (default: the run's, else 1024).")
@click.option("--max-examples", type=click.IntRange(1), help="Evaluate the first N examples only.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--quant", type=click.Choice(QUANT_TYPES),
              help="Quantize the base while loading (default: a run's recipe; nf4 under a PEFT adapter folder; "
                   "none for a model folder, e.g. a merged export: it runs as stored, as in generate).")
@click.option("--base", help="Base model for a PEFT adapter folder (default: the adapter's base_model_name_or_path).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="GGUF files: dtype the weights are dequantized to.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--keep-quantized", is_flag=True,
              help="Dequantize per matmul as in training (less memory, slower) instead of once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Accept a base stored only as pickle (.bin).")
@click.option("--trust-remote-code", is_flag=True, help="Run model code shipped inside the model folder.")
def command(source, data_path, fmt, objective, beta, all_tokens, max_length, max_examples, batch_size, quant, base,
            dtype, device, keep_quantized, as_json, progress, allow_pickle, trust_remote_code) -> None:
    """Mean loss per token and perplexity of SOURCE on a data set: a model folder or built-in name (--quant to
    quantize it), a run folder (quantized base + adapter, as trained), a PEFT adapter folder, a merged export, or
    a .gguf file. Prompt tokens take no loss, as in training (--all-tokens: every token; text data: always).

    \b
      qlora-kit eval smollm2-135m --quant nf4 --data pydoc-heldout --max-examples 30 --max-length 256
      qlora-kit eval runs/demo                       # the run's own validation split: training's val_loss
      qlora-kit eval merged/ --data recipes/data/facts.jsonl --format alpaca
    """
    from qlora_kit.infer import evaluation
    from qlora_kit.device import resolve_device
    from qlora_kit.export.gguf import reader

    req = evaluation.Request(source=source, data=data_path, format=fmt, all_tokens=all_tokens, max_length=max_length,
                             max_examples=max_examples, batch_size=batch_size, quant=quant, base=base, dtype=dtype,
                             device=str(resolve_device(device)), fast=not keep_quantized, allow_pickle=allow_pickle,
                             trust_remote_code=trust_remote_code, objective=objective, beta=beta,
                             read_gguf=reader.load)
    res = evaluation.run(req, progress=progress and not as_json)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return
    what = "prompt tokens masked" if res.masked else "every token"
    click.echo(f"{res.source} ({res.kind}, base {res.quant}) on {res.data} [{res.format}, {what}]")
    click.echo(f"  examples {res.examples}, label tokens {res.tokens:,}, {res.tokens_per_s:,.0f} tokens/s")
    if res.preference:
        pr = res.preference
        acc = f"  reward accuracy {pr['reward_accuracy']:.3f}" if "reward_accuracy" in pr else ""
        click.echo(f"  {pr['objective']} loss {res.loss:.4f} (beta {pr['beta']:g}){acc}  reward margin "
                   f"{pr['reward_margin']:.4f}")
        return
    click.echo(f"  loss {res.loss:.4f}  perplexity {res.perplexity:.3f}")
