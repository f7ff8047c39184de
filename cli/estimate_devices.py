"""`qlora-kit estimate --gpus N --parallel ddp|fsdp`: memory per device of a multi-process run, and which settings
make it fit (qlora_kit.estimate.devices)."""

from __future__ import annotations

import json

import click

from qlora_kit.estimate import devices as md
from qlora_kit.estimate import analytic as me
from qlora_kit.cli.estimate_labels import LABELS, PHASES, seq_cell
from qlora_kit.terms import human_bytes

DEVICE_LABELS = {
    **LABELS,
    "frozen_shard": "frozen base, this GPU's shard (1/N)",
    "gathered_layers": "gathered decoder layers (current + prefetch)",
    "head_gathered": "lm_head, gathered around the loss only",
    "root_gathered": "final norm (tied: + embeddings/lm_head), all step",
}


def report(model: str, config: dict, cfg: me.EstimateConfig, gpus: int, parallel: str, gpu_mem: str | None,
           limit: int | None, as_json: bool) -> None:
    d = md.per_device(config, cfg, gpus, parallel)
    table = md.max_seq_table(config, cfg, gpus, parallel)
    fixes = md.what_fits(config, cfg, gpus, parallel, limit) if limit is not None and d.total > limit else []
    if as_json:
        click.echo(json.dumps({"model": model, "config": {**vars(cfg), "targets": list(d.one_device.adapted)},
                               **d.to_dict(), "gpu_mem": limit, "fits": None if limit is None else d.total <= limit,
                               "what_fits": fixes, "max_seq": table}))
        return
    s = d.one_device.shapes
    click.echo(f"{model}: {s.model_type}, {s.total / 1e9:,.2f}B params, {s.layers} layers; {gpus} GPUs, {parallel}; "
               f"per GPU: batch {cfg.batch} x seq {cfg.seq}, LoRA r={cfg.rank} (replicated on every GPU)\n")
    width = max(map(len, DEVICE_LABELS.values()))
    click.echo(f"{'per GPU (at the peak)':<{width}}  {'size':>11}")
    for key, value in d.per_device.items():
        if value:
            click.echo(f"{DEVICE_LABELS[key]:<{width}}  {human_bytes(value):>11}")
    click.echo(f"{'total per GPU':<{width}}  {human_bytes(d.total):>11}   (one GPU alone: "
               f"{human_bytes(d.one_device.total)}; peak in the {PHASES[d.peak_phase]})")
    if limit is not None:
        gpu = gpu_mem.strip()
        if d.total <= limit:
            click.echo(f"fits in {gpu} per GPU: yes ({d.total / limit:.0%} used)")
        else:
            click.echo(f"fits in {gpu} per GPU: no (needs {human_bytes(d.total)}, {human_bytes(d.total - limit)} more)")
            if fixes:
                click.echo("these settings make it fit:")
                for f in fixes:
                    click.echo(f"  {' + '.join(f['changes']):<90} {human_bytes(f['total'])}")
            else:
                click.echo("no setting tried here makes it fit (optimizer, batch 1, rank 8, more GPUs)")
    click.echo(f"\nlongest sequence per GPU at batch {cfg.batch}, {gpus} GPUs, {parallel}:")
    for row in table:
        click.echo(f"  {row['gpu_gib']:>3} GiB  {seq_cell(row)}")
