"""`qlora-kit bench memory`'s grid: configurations from `key=v1,v2` text, each measured in its own process.

Every configuration runs as `python -m qlora_kit.measure.breakdown --json` in a subprocess, so each peak is that
configuration's alone. Keys and defaults are MeasureConfig's (whose defaults are the recipe's, config.py).
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import shlex
import subprocess
import sys
import typing
from dataclasses import asdict

from ..config import Objective, Optimizer
from ..errors import ConfigError
from .breakdown import MeasureConfig
from ..terms import QUANT_TYPES

# Grid keys -> (parser, allowed values or None). Values are comma-separated; the grid is their product. Paged
# optimizers page to CPU memory under CUDA only, so the grid offers the others.
_OPTIMIZERS = tuple(o for o in typing.get_args(Optimizer) if not o.startswith("paged"))
GRID_KEYS = {"seq": (int, None), "batch": (int, None), "rank": (int, None), "quant": (str, QUANT_TYPES),
             "dropout": (float, None), "optimizer": (str, _OPTIMIZERS), "targets": (str, None),
             "loss_chunk": (int, None), "offload_activations": (int, (0, 1)), "mlp_chunk": (int, None),
             "dora": (int, (0, 1)), "ia3": (int, (0, 1)), "objective": (str, typing.get_args(Objective)),
             "precompute_reference": (int, (0, 1))}
_ZERO_OK = ("offload_activations", "mlp_chunk", "dora", "ia3", "precompute_reference")  # 0 means off
DEFAULTS = {k: v for k, v in asdict(MeasureConfig()).items() if k in GRID_KEYS}
SHORT = {"seq": "s", "batch": "b", "rank": "r", "dropout": "d"}


def _values(key: str, text: str) -> list:
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
            raise ConfigError(f"grid {key}={text}: {raw!r} is not one of {', '.join(map(str, allowed))}")
        if cast is int and (v < 0 if key in _ZERO_OK else v <= 0) or key == "dropout" and not 0 <= v < 1:
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
    parts += [f"{k}={c[k]}" for k in ("dropout", "optimizer", "targets", "loss_chunk", "mlp_chunk")
              if c[k] != DEFAULTS[k]]
    parts += ["offload"] if c["offload_activations"] else []
    parts += [k for k in ("dora", "ia3") if c.get(k)]
    parts += [c["objective"]] if c.get("objective", "sft") != "sft" else []
    parts += ["precomputed reference"] if c.get("precompute_reference") else []
    return " ".join(parts)


def run_one(model: str, c: dict, steps: int, threads: int, device: str, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "qlora_kit.measure.breakdown", "--json", "--model", model, "--steps", str(steps),
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


def check_model(model: str) -> None:
    """bench memory loads and trains the model: a shape the estimate knows by name is not enough."""
    from pathlib import Path

    from ..estimate.analytic import load_model_config

    if not (Path(model).expanduser() / "config.json").is_file() and model != "smollm2-135m":
        load_model_config(model)  # raises the helpful error for a missing folder or a misspelt name
        raise ConfigError(f"{model} is a shape the estimate knows but not a model with weights; bench memory loads "
                          "and trains the model: pass a model folder, or smollm2-135m")


def run_grid(model: str, runs: list[dict], steps: int, threads: int, device: str, timeout: int, command: str,
             progress: bool = True) -> dict:
    """Measure each configuration in its own process; the document memory.json holds (and the report renders)."""
    import datetime

    from tqdm.auto import tqdm

    from .breakdown import machine_info

    machine = machine_info()
    results = []
    bar = tqdm(runs, desc="bench memory", unit="config", disable=not progress, dynamic_ncols=True)
    for c in bar:
        bar.set_postfix_str(label(c))
        r = run_one(model, c, steps, threads, device, timeout)
        results.append(r)
        if "failed" in r:
            tqdm.write(f"{label(c)}: FAILED {r['failed']}", file=sys.stderr)
        else:
            tqdm.write(f"{r['label']}: predicted {r['estimate_total'] / 2**20:,.1f} MiB, measured "
                       f"{r['peak_bytes'] / 2**20:,.1f} MiB ({r['error']:+.1%})", file=sys.stderr)
    bar.close()
    return {"model": model, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command, "machine": machine, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "results": results}
