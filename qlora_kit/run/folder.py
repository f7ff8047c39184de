"""The run folder: what `qlora-kit train --out RUN_DIR` writes, and the checks before writing into one.

    RUN_DIR/recipe.yaml      the resolved recipe (every key, after --set)
    RUN_DIR/metrics.jsonl    one JSON object per logged step
    RUN_DIR/checkpoints/     step-N/ (see checkpoint.py)
    RUN_DIR/adapter/         the final adapter in PEFT format
    RUN_DIR/summary.json     wall time, tokens/s, peak memory, parameter counts
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from .. import atomic
from . import checkpoint
from ..config import Recipe, dump_recipe, recipe_from_dict
from ..errors import ConfigError
from .lock import LOCK_NAME

_DEBRIS = re.compile(r"^\..+\.(tmp|old)-\d+$")  # atomic.temp_name's names

# Sections that must not change when resuming: the checkpoint's tensors only make sense with them.
_FIXED_ON_RESUME = ("model", "quant", "lora", "data")


def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file()


def _leftovers(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(what RUN_DIR holds, what is only debris): the lock file and the temporaries of an atomic write that a
    killed process left (`.recipe.yaml.tmp-PID`) are not a run, and nothing else writes them."""
    if not run_dir.is_dir():
        return [], []
    entries = [e for e in run_dir.iterdir() if e.name != LOCK_NAME]
    debris = [e for e in entries if _DEBRIS.match(e.name)]
    return [e for e in entries if e not in debris], debris


def check_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> Path | None:
    """Refuse to overwrite a run; on --resume return the checkpoint to start from (None: start at step 0, also
    when a resumed run died before its first checkpoint: there is nothing to lose, and no other folder to pick).
    Call it holding the folder's lock (lock.py): the debris it removes is then no live writer's."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file, not a folder; choose a folder with --out.")
    content, debris = _leftovers(run_dir)
    if not resume:
        if content:
            raise ConfigError(f"run folder {run_dir} already exists and is not empty. Pass --resume to continue "
                              "that run, or choose a new folder with --out.")
        return None  # debris only (a process killed before recipe.yaml was in place): open_run clears it
    if not content:
        killed = " (only the temporary files of a run killed before it wrote recipe.yaml)" if debris else ""
        raise ConfigError(f"--resume: {run_dir} holds no run to resume{killed}. Drop --resume to start a new run "
                          "there.")
    if not is_run_dir(run_dir):
        raise ConfigError(f"--resume: {run_dir} is not a qlora-kit run folder (no recipe.yaml).")
    try:
        saved = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError, ConfigError) as e:
        raise ConfigError(f"--resume: {run_dir}/recipe.yaml is damaged ({e}); it must describe the run to resume. "
                          "Start a new run in another folder.") from None
    for section in _FIXED_ON_RESUME:
        if getattr(saved, section) != getattr(recipe, section):
            raise ConfigError(f"--resume: the '{section}' section differs from the run's recipe.yaml; a run resumes "
                              f"with the settings it started with (only train/output may change).")
    return checkpoint.latest(run_dir)


def write_metrics_line(run_dir: Path, record: dict) -> None:
    # NaN/inf (a skipped non-finite batch) as null: `json.dumps` would write NaN, which is not JSON (jq rejects it)
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
    except OSError as e:
        raise atomic.named(e, path) from None


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):  # a line cut by a crash mid-write, or damaged: drop it
            continue
        if isinstance(record, dict):  # each line is one step's object; anything else is not ours
            out.append(record)
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint (those steps run again); atomic rewrite."""
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))


def run_of(path: Path) -> Path | None:
    """The run folder that `path` is, or whose `adapter/` it is; None for anything else."""
    path = Path(path).expanduser()
    if is_run_dir(path):
        return path
    if path.name == "adapter" and is_run_dir(path.parent):
        return path.parent
    return None


def adapter_source(path: str | Path) -> tuple[Path, Recipe | None]:
    """(adapter folder, the run's recipe or None): a run folder, RUN/adapter, or a plain adapter folder as is."""
    run = run_of(Path(path))
    if run is None:
        return Path(path).expanduser(), None
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        raise ConfigError(f"run folder {run} has no adapter/ yet: training writes it when it ends. Finish it with "
                          f"`qlora-kit train {run}/recipe.yaml --out {run} --resume`, or pass an adapter folder.")
    return run / "adapter", recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))


def open_run(run_dir: Path, recipe: Recipe, start_ckpt: Path | None, resume: bool, step: int) -> None:
    """Rank 0, once every rank has loaded: clear what killed writers left (`.NAME.tmp-PID`); a resumed run drops
    the metrics after its checkpoint (those steps run again); a fresh run writes recipe.yaml."""
    import sys

    for entry in _leftovers(run_dir)[1]:  # temporaries of a killed writer (we hold the lock: none is live)
        atomic.remove(entry)
    if start_ckpt is not None:
        truncate_metrics(run_dir, step)
        print(f"resuming from {start_ckpt} (step {step} of {recipe.train.steps})", file=sys.stderr)
    elif resume:  # the run died before its first checkpoint: start over in the same folder
        truncate_metrics(run_dir, 0)
        print(f"{run_dir} has no complete checkpoint yet: starting from step 0", file=sys.stderr)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
