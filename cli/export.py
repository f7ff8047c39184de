"""`qlora-kit export`: a run or adapter folder -> one of export.formats.FORMATS, then the loss check beside it."""

from __future__ import annotations

from pathlib import Path

import click

from qlora_kit.cli.options import NonEmptyPath

from qlora_kit.export import formats as ex
from qlora_kit.config import DataFormat
from qlora_kit.terms import QUANTIZED_TYPES, human_bytes

DATA_FORMATS = list(DataFormat.__args__)


@click.command()
@click.argument("source", metavar="RUN_DIR|ADAPTER_DIR", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(list(ex.FORMATS)), required=True,
              help="; ".join(f"{f.name}: {f.help}" for f in ex.FORMATS.values()) + ".")
@click.option("--out", required=True, type=NonEmptyPath(path_type=Path), help="Folder to create (gguf: file).")
@click.option("--gguf-type", default="f16", show_default=True, metavar="TYPE",
              help="GGUF tensor type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1; mxfp4 (llama.cpp's MXFP4_MOE: MoE "
              "experts MXFP4, the rest Q8_0; MoE models only); the K-quants q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m "
              "q5_k_s q5_k_m q6_k need the llama-cpp extra. gguf-adapter: f32 f16 bf16.")
@click.option("--base", default=None, help="Base model folder or built-in name (default: the run's model, or the "
              "adapter's base_model_name_or_path).")
@click.option("--merge-base", type=click.Choice(["dequantized", "original"]), default="dequantized", show_default=True,
              help="dequantized: dequant(quant(W)), the weights the adapter was trained against (exact); original: "
              "the checkpoint's W (exact only for adapters trained without quantization).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Output dtype [default: bf16; adapter format: the adapter's own].")
@click.option("--max-shard-size", default="2GB", show_default=True,
              help="Largest weight file: 2GB (10^9), 1.5GiB, 500MB.")
@click.option("--quant", type=click.Choice(QUANTIZED_TYPES), default=None,
              help="For an adapter folder: how its base was quantized in training [default: nf4]; also the type "
              "--format quantized writes when the run was not quantized.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where weights are quantized for the dequantized base / requantization (auto: CUDA if present).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once the new export is complete).")
@click.option("--allow-lossy", is_flag=True, help="--format quantized: write it even when re-quantizing keeps "
              "almost none of the adapter's change (refused by default: it would answer like the base).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Measure what the export preserved: its loss next to the training-time model's and the base's "
                   "on the run's validation split (or --check-data), written beside the export. --no-check for "
                   "huge models.")
@click.option("--check-data", metavar="FILE|NAME", default=None,
              help="Data for the check (default: the run's validation split; needed for an adapter folder).")
@click.option("--check-format", type=click.Choice(DATA_FORMATS), default=None,
              help="Format of --check-data (default: the run's data.format, else text).")
@click.option("--check-examples", default=64, show_default=True, type=click.IntRange(1),
              help="Examples the check evaluates (the first N).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def command(source, fmt, out, gguf_type, base, merge_base, dtype, max_shard_size, quant, device, force, allow_lossy,
            check, check_data, check_format, check_examples, progress):
    """Export RUN_DIR (or a PEFT LoRA ADAPTER_DIR) as a PEFT adapter, a merged model or a requantized model.

    The merge streams tensor by tensor: memory stays near the adapter plus one weight, whatever the model size.
    --merge-base dequantized (default) merges into dequant(quant(W)), the weights a QLoRA adapter was trained
    against, so the merged model computes what the training-time model computed; pick original only for adapters
    trained on the unquantized base (then it is the exact one). For an ADAPTER_DIR, --quant says how its base was
    quantized in training (default nf4, blocksize 64, double quant).

    A run trained on a pre-quantized base (a bitsandbytes `*-bnb-4bit` / 8-bit checkpoint) exports from that base
    itself: its stored codes dequantized, then merged; the merged model is that quantized base plus the adapter's
    change, not the original 16-bit model. With the original 16-bit model, --base ORIGINAL merges onto it:
    recomputing the same codes from it (dequantized), or onto W itself (--merge-base original).

    Every export is then checked (--no-check to skip): its loss next to the training-time model's and the base's
    on the run's validation split (or --check-data), printed and written to DIR/export_check.json
    (FILE.check.json beside a GGUF), with a warning when it keeps under half of the training's improvement.

    gguf-adapter adds the LoRA to whatever base GGUF llama.cpp is given: a GGUF of the ORIGINAL base. A QLoRA
    adapter was trained against the 4-bit-rounded base, so the exact model is --format gguf (merged).

    \b
    qlora-kit export runs/demo --format merged --out merged/
    qlora-kit export runs/demo --format quantized-adapter --out demo-nf4/   (4-bit base as trained + adapter/)
    qlora-kit export my-peft-adapter/ --base path/to/base --format merged --merge-base original --out merged/
    qlora-kit export runs/demo --format gguf --gguf-type q8_0 --out demo.gguf    (+ demo.Modelfile for Ollama)
    qlora-kit export runs/demo --format gguf-adapter --out demo-lora.gguf
    """
    opts = ex.Options(format=fmt, out=out, base=base, merge_base=merge_base, dtype=dtype,
                      max_shard_size=max_shard_size, force=force, quant=quant, device=device, progress=progress,
                      gguf_type=gguf_type, allow_lossy=allow_lossy)
    if check and check_data is not None:  # a bad check data file fails before anything is written
        from qlora_kit.infer import export_check

        export_check.check_data(source, check_data, check_format)
    result = ex.export(source, opts)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    size = f", {human_bytes(result.weight_bytes)} of weights" if result.weight_bytes else ""
    # binary units scaled to the size: a small export reads "41.20 MiB/s", never "0.00 GB/s"
    speed = (f" ({human_bytes(round(result.weight_bytes / result.seconds))}/s)"
             if result.weight_bytes and result.seconds > 0 else "")
    click.echo(f"wrote {fmt} export to {result.out}: {len(result.files)} files{size} in {result.seconds:.1f} s{speed}")
    kept = result.survival
    if kept is not None:
        click.echo(f"re-quantizing kept {kept.kept:.1%} of the adapter's change ({kept.changed:.1%} of the quantized "
                   "codes differ from the base's)")
    if check:
        _report(source, result, base, quant, check_data, check_format, check_examples, device)


def _report(source, result, base, quant, check_data, check_format, check_examples, device) -> None:
    """The export's loss beside the run's and the base's (infer.export_check), printed and written beside it."""
    from qlora_kit.device import resolve_device
    from qlora_kit.export.gguf import reader
    from qlora_kit.infer import export_check

    extra = {"format": result.format}
    if result.survival is not None:
        extra["requantized"] = {"kept": result.survival.kept, "changed": result.survival.changed}
    c = export_check.run_check(source, result.out, base, quant, check_data, check_format, check_examples,
                               str(resolve_device(device)), extra, read_gguf=reader.load)
    click.echo(export_check.loss_line(c))
    click.echo(f"wrote {export_check.check_path(result.out)}")
    if c.lost:
        click.echo(f"warning: this export keeps only {c.recovered:.0%} of the training's loss improvement (export "
                   f"{c.export_loss:.4f}, training-time model {c.run_loss:.4f}, base {c.base_loss:.4f}): it lost "
                   "most of the fine-tune. A 4-bit export that keeps it: --format quantized-adapter.", err=True)
