"""`qlora-kit bench memory`: measure, component by component, what `qlora-kit estimate` predicts.

The grid and the runs are qlora_kit.measure.grid; the report (DIR/memory.json, memory.md: predicted vs measured
per component, memory.png: stacked bars) is qlora_kit.measure.report. This command parses and calls.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from qlora_kit.measure.grid import GRID_KEYS, check_model, expand, parse_specs, run_grid


@click.group()
def command() -> None:
    """Benchmarks: `qlora-kit bench memory` measures what `qlora-kit estimate` predicts."""


@command.command("memory")
@click.argument("specs", nargs=-1, metavar="[KEY=V1,V2 ...]")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model folder or built-in name.")
@click.option("--grid", "grids", multiple=True, help='Grid entries, e.g. --grid "seq=128,256 rank=8,16 quant=nf4,none '
              'batch=1,4" (same as the KEY=V1,V2 arguments). Keys: ' + ", ".join(GRID_KEYS) + "; targets "
              "alternatives are separated by ';' (targets=all-linear;q_proj,v_proj).")
@click.option("--config", "configs", multiple=True, help='One configuration, e.g. --config "seq=512 rank=64"; '
              "repeatable, added after the grid's product.")
@click.option("--steps", type=click.IntRange(2), default=3, show_default=True,
              help="Steps per configuration: the first creates the optimizer state, the last is profiled.")
@click.option("--threads", type=click.IntRange(0), default=0, help="torch threads in each child (0: default).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="bench/results", show_default=True)
@click.option("--timeout", type=click.IntRange(1), default=1800, show_default=True, help="Seconds per configuration.")
@click.option("--no-progress", is_flag=True)
def memory(specs, model, grids, configs, steps, threads, device, out, timeout, no_progress) -> None:
    """Measure each configuration in its own process; write memory.json, memory.md and memory.png to --out.

    \b
    qlora-kit bench memory seq=128,512 rank=16 quant=nf4,none batch=4
    qlora-kit bench memory --model path/to/model --grid "seq=256 rank=8,64" --config "seq=512 batch=1"
    """
    from qlora_kit.measure import report as memory_report

    runs = expand(parse_specs([*grids, *specs]), list(configs))
    check_model(model)
    command_line = shlex.join(["qlora-kit", "bench", "memory", *specs, "--model", model,
                               *(a for g in grids for a in ("--grid", g)),
                               *(a for c in configs for a in ("--config", c)),
                               "--steps", str(steps), "--threads", str(threads), "--device", device, "--out", out])
    doc = run_grid(model, runs, steps, threads, device, timeout, command_line, progress=not no_progress)
    names = memory_report.write(doc, Path(out))
    ok = [r for r in doc["results"] if "failed" not in r]
    worst = max((abs(r["error"]) for r in ok), default=0.0)
    click.echo(f"{len(ok)}/{len(runs)} configurations measured; worst estimate error {worst:.1%}; "
               f"wrote {Path(out) / names[0]}, {', '.join(names[1:])}")
    if len(ok) < len(runs):
        click.get_current_context().exit(1)
