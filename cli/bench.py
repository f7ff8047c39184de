"""`qlora-kit bench memory`: measure, component by component, what `qlora-kit estimate` predicts.

Every configuration runs in its own subprocess (`python -m qlora_kit.memory_measure --json`), so each peak is
that configuration's alone; the results go to DIR/memory.json, DIR/memory.md (predicted vs measured per component)
and DIR/memory.png (stacked bars per configuration, predicted and measured side by side).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click

from qlora_kit.errors import ConfigError
from qlora_kit.terms import QUANT_TYPES

# Grid keys -> (parser, allowed values or None). Values are comma-separated; the grid is their product.
_OPTIMIZERS = ("adamw", "adamw8bit")
GRID_KEYS = {"seq": (int, None), "batch": (int, None), "rank": (int, None), "quant": (str, QUANT_TYPES),
             "dropout": (float, None), "optimizer": (str, _OPTIMIZERS), "targets": (str, None),
             "loss_chunk": (int, None)}
DEFAULTS = {"seq": 256, "batch": 4, "rank": 16, "quant": "nf4", "dropout": 0.05, "optimizer": "adamw",
            "targets": "all-linear", "loss_chunk": 0}  # loss_chunk 0: the library's default
SHORT = {"seq": "s", "batch": "b", "rank": "r", "dropout": "d"}


def _values(key: str, text: str) -> list:
    import difflib

    if key not in GRID_KEYS:
        near = difflib.get_close_matches(key, GRID_KEYS, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"unknown grid key {key!r}{hint}; keys: {', '.join(GRID_KEYS)}")
    cast, allowed = GRID_KEYS[key]
    out = []
    # targets take `;` between alternatives, since a target list itself is comma-separated (q_proj,v_proj)
    for raw in text.split(";" if key == "targets" else ","):
        raw = raw.strip()
        try:
            v = cast(raw)
        except ValueError:
            kind = {"int": "an integer", "float": "a number"}[cast.__name__]
            raise ConfigError(f"grid {key}={text}: {raw!r} is not {kind}") from None
        if allowed is not None and v not in allowed:
            raise ConfigError(f"grid {key}={text}: {raw!r} is not one of {', '.join(allowed)}")
        if cast is int and v <= 0 or key == "dropout" and not 0 <= v < 1:
            raise ConfigError(f"grid {key}={text}: {raw!r} is out of range")
        out.append(v)
    return out


def parse_specs(specs: list[str]) -> dict[str, list]:
    """['seq=128,256', 'rank=8 quant=nf4,none'] -> {'seq': [128, 256], 'rank': [8], 'quant': ['nf4', 'none']}."""
    grid: dict[str, list] = {}
    for spec in specs:
        for item in spec.split():
            key, eq, text = item.partition("=")
            if not eq or not text:
                raise ConfigError(f"cannot read grid entry {item!r}: write key=value[,value...], e.g. seq=128,256")
            if key in grid:
                raise ConfigError(f"grid key {key!r} given twice; list its values once: {key}=a,b")
            grid[key] = _values(key, text)
    return grid


def expand(grid: dict[str, list], configs: list[str]) -> list[dict]:
    """The grid's product (defaults for absent keys), then each explicit --config; duplicates dropped."""
    out: list[dict] = []
    if grid or not configs:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            out.append({**DEFAULTS, **dict(zip(keys, combo))})
    for text in configs:
        one = parse_specs([text])
        if any(len(v) != 1 for v in one.values()):
            raise ConfigError(f"--config {text!r}: one value per key (a grid goes in GRID arguments)")
        out.append({**DEFAULTS, **{k: v[0] for k, v in one.items()}})
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def label(c: dict) -> str:
    parts = [f"{SHORT.get(k, '')}{c[k]}" for k in ("seq", "rank", "quant", "batch")]
    parts += [f"{k}={c[k]}" for k in ("dropout", "optimizer", "targets", "loss_chunk") if c[k] != DEFAULTS[k]]
    return " ".join(parts)


def run_one(model: str, c: dict, steps: int, threads: int, device: str, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "qlora_kit.memory_measure", "--json", "--model", model, "--steps", str(steps),
           "--threads", str(threads), "--device", device,
           *(a for k, v in c.items() for a in ("--" + k.replace("_", "-"), str(v)))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # spinning OpenMP threads skew timings (docs/ARCHITECTURE.md, "Benchmarks")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": c, "failed": f"timed out after {timeout} s", "command": shlex.join(cmd)}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])
        return {"config": c, "failed": f"exit {p.returncode}: {tail}", "command": shlex.join(cmd)}
    return {**json.loads(lines[-1]), "label": label(c)}


def mib(n: int | float) -> str:
    v = n / 2**20
    return f"{v:,.1f}" if v >= 10 else f"{v:.3f}"


def markdown(doc: dict) -> str:
    from qlora_kit.memory_estimate import COMPONENTS

    m = doc["machine"]
    ok = [r for r in doc["results"] if "failed" not in r]
    lines = [
        "# `qlora-kit bench memory`", "",
        f"Model `{doc['model']}`, {doc['date']}. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['ram_bytes'] / 2**30:.1f} GiB RAM; load average before/after {m['loadavg']} / {doc['loadavg_after']}"
        f"{' (shared, noisy machine)' if max(m['loadavg'][0], doc['loadavg_after'][0]) > 1 else ''}.", "",
        f"Command: `{doc['command']}`", "",
        "**Measured** = bytes held by live tensors at the step's worst moment (static tensors + the peak of one "
        "steady step's allocations, from the allocator's events under `torch.profiler(profile_memory=True)`): the "
        "CPU analogue of CUDA's `max_memory_allocated`, and what the estimate is checked against (target: within "
        "10%). RSS also holds the interpreter, libraries and the allocator's cache; it is shown for reference "
        "(step peak: VmHWM over an unprofiled step). Sizes in MiB.", "",
        "| configuration | predicted | measured | error | peak phase: predicted / measured | RSS after imports "
        "/ after load / step peak | tokens/s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in ok:
        rss = r["rss"]
        step = mib(rss["step_peak"]) if rss["step_peak"] else "-"
        lines.append(f"| {r['label']} | {mib(r['estimate_total'])} | {mib(r['peak_bytes'])} | {r['error']:+.1%} | "
                     f"{r['estimate_phase']} / {r['peak_phase']} | {mib(rss['after_imports'])} / "
                     f"{mib(rss['after_load'])} / {step} | {r['tokens_per_s']:,.0f} |")
    for r in doc["results"]:
        if "failed" in r:
            lines.append(f"| {label(r['config'])} | failed: {r['failed']} | | | | | |")
    if any(r["device"] == "cpu" for r in ok):
        lines += ["", "On the CPU the estimate runs with `--device cpu`: no CUDA context allowance; LoRA dropout masks "
                  "are kept in the compute dtype (bool on CUDA); attention is SDPA's CPU kernel; a 4-bit Linear whose "
                  "in_features is not a multiple of the blocksize is dequantized in plain torch (int64 codes + fp32 "
                  "values live at once: a `dequant_workspace` term). The peak phase is where the step's worst moment "
                  "falls: the loss head (one chunk of fp32 logits and two gradients of the same size), the decoder "
                  "backward (layer inputs + one recomputed layer) or the optimizer step."]
    if ok:
        lines += ["", "Per component at the peak moment, predicted / measured (MiB):", "",
                  "| component | " + " | ".join(r["label"] for r in ok) + " |",
                  "|---|" + "---:|" * len(ok)]
        keys = [k for k in COMPONENTS if any(r["estimate"][k] or r["at_peak"][k] for r in ok)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{mib(r['estimate'][k])} / {mib(r['at_peak'][k])}" for r in ok)
                         + " |")
        lines.append("| **total** | " + " | ".join(f"**{mib(r['estimate_total'])} / {mib(r['peak_bytes'])}**"
                                                  for r in ok) + " |")
        lines += ["", "Each component's own maximum over the step, predicted / measured (MiB; they peak at "
                  "different moments, so these do not add up to the peak):", "",
                  "| component | " + " | ".join(r["label"] for r in ok) + " |", "|---|" + "---:|" * len(ok)]
        for k in ("adapter_grads", "activations", "logits_and_loss"):
            lines.append(f"| {k} | " + " | ".join(
                f"{mib(r['estimate_sizes'][k])} / {mib(r['component_peaks'][k])}" for r in ok) + " |")
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlora_kit.memory_estimate import COMPONENTS

    ok = [r for r in doc["results"] if "failed" not in r]
    keys = [k for k in COMPONENTS if any(r["estimate"][k] or r["at_peak"][k] for r in ok)]
    colors = dict(zip(COMPONENTS, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(ok) + 2), 5.5))
    width = 0.38
    for i, r in enumerate(ok):
        for dx, src, hatch in ((-width / 2, r["estimate"], ""), (width / 2, r["at_peak"], "//")):
            bottom = 0.0
            for k in keys:
                v = src[k] / 2**20
                ax.bar(i + dx, v, width, bottom=bottom, color=colors[k], hatch=hatch, edgecolor="white",
                       label=k if i == 0 and dx < 0 else None)
                bottom += v
        ax.text(i, max(r["estimate_total"], r["peak_bytes"]) / 2**20, f"{r['error']:+.1%}", ha="center",
                va="bottom", fontsize=8)
    ticks = [" ".join(r["label"].split()[:4]) + "".join("\n" + x for x in r["label"].split()[4:]) for r in ok]
    ax.set_xticks(range(len(ok)), [t + "\npredicted | measured" for t in ticks], fontsize=7)
    ax.set_ylim(0, 1.12 * max(max(r["estimate_total"], r["peak_bytes"]) for r in ok) / 2**20)
    ax.set_ylabel("MiB at the step's peak")
    ax.set_title(f"qlora-kit bench memory: {doc['model']} ({ok[0]['device'] if ok else ''})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    from tqdm.auto import tqdm

    from qlora_kit.memory_estimate import load_model_config
    from qlora_kit.memory_measure import machine_info

    runs = expand(parse_specs([*grids, *specs]), list(configs))
    if not (Path(model).expanduser() / "config.json").is_file() and model != "smollm2-135m":
        load_model_config(model)  # raises the helpful error for a missing folder or a misspelt name
        raise ConfigError(f"{model} is a shape the estimate knows but not a model with weights; bench memory loads "
                          "and trains the model: pass a model folder, or smollm2-135m")
    machine = machine_info()
    results = []
    bar = tqdm(runs, desc="bench memory", unit="config", disable=no_progress, dynamic_ncols=True)
    for c in bar:
        bar.set_postfix_str(label(c))
        r = run_one(model, c, steps, threads, device, timeout)
        results.append(r)
        if "failed" in r:
            tqdm.write(f"{label(c)}: FAILED {r['failed']}", file=sys.stderr)
        else:
            tqdm.write(f"{r['label']}: predicted {mib(r['estimate_total'])} MiB, measured {mib(r['peak_bytes'])} "
                       f"MiB ({r['error']:+.1%})", file=sys.stderr)
    bar.close()
    doc = {"model": model, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": shlex.join(["qlora-kit", "bench", "memory", *specs, "--model", model,
                                  *(a for g in grids for a in ("--grid", g)), *(a for c in configs for a in ("--config", c)),
                                  "--steps", str(steps), "--threads", str(threads), "--device", device, "--out", out]),
           "machine": machine, "loadavg_after": [round(x, 2) for x in os.getloadavg()], "results": results}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "memory.md").write_text(markdown(doc))
    if any("failed" not in r for r in results):
        chart(doc, out / "memory.png")
    ok = [r for r in results if "failed" not in r]
    worst = max((abs(r["error"]) for r in ok), default=0.0)
    click.echo(f"{len(ok)}/{len(results)} configurations measured; worst estimate error {worst:.1%}; "
               f"wrote {out / 'memory.md'}, memory.json, memory.png")
    if len(ok) < len(results):
        click.get_current_context().exit(1)
