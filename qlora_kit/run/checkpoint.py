"""Run state on disk, written atomically: a checkpoint is complete or absent, never half there.

    RUN_DIR/checkpoints/step-N/
        adapter_model.safetensors   the adapter (our module names; bf16)
        optimizer.safetensors       fp32 master weights + optimizer tensors (exp_avg, exp_avg_sq, ...)
        state.json                  step, optimizer scalars and param groups, data position, RNG states, version
                                    (several processes: world_size, and one RNG state per rank in rank order)

A checkpoint is written into `checkpoints/.tmp-step-N-PID`, fsynced, then renamed to `step-N`
(`atomic.atomic_folder`); a crash leaves at most a `.tmp-*` folder, which `latest()` ignores and the next save
removes. `latest()` also skips a `step-N` that lacks a file (copied by hand, or a file system without atomic
rename). A full disk while saving removes the partial folder and stops training with a message; the previous
checkpoints stay. Only safetensors and JSON: nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__, atomic
from ..errors import QloraKitError, TrainingStopped

_STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("adapter_model.safetensors", "optimizer.safetensors", "state.json")  # all three, or not a checkpoint


def _flatten(obj, prefix: str, tensors: dict, path: str = "") -> object:
    """Replace every tensor inside nested dicts/lists by a {"__tensor__": key} marker, collecting the tensors."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{path}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, prefix, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, prefix, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def _unflatten(obj, tensors: dict) -> object:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def rng_state(device: torch.device | str = "cpu") -> dict:
    """The RNG states training draws from: torch's CPU generator, Python's, and the TRAINING device's CUDA generator
    only. (`torch.cuda.get_rng_state_all()` would create a context on every visible GPU, even for a CPU run, and a
    checkpoint holding N states cannot be restored where fewer GPUs are visible.)"""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | str = "cpu") -> None:
    """Restore what `rng_state` saved; the CUDA state goes to the training device only (none for a CPU run)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    device = torch.device(device)
    cuda = state.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, list):  # written by an older qlora-kit: one state per visible GPU
            cuda = cuda[min(device.index or 0, len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, device)


def save(run_dir: Path, step: int, adapter: dict[str, torch.Tensor], optimizer: dict, extra: dict, keep: int,
         device: torch.device | str = "cpu", rng: list[dict] | None = None) -> Path:
    """Write checkpoint `step` atomically, then keep only the newest `keep` checkpoints. `device`: the training
    device, whose RNG state (and no other GPU's) is saved. `rng`: instead, every rank's RNG state (rank order) in
    a multi-process run."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".step-*.old-*")]:  # left by a crash mid-save
        atomic.remove(stale)
    final = root / f"step-{int(step)}"  # names come from an int only: nothing can escape root
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "step": step,
        "qlora_kit_version": __version__,
        "optimizer": _flatten(optimizer, "optimizer", tensors),
        "rng": _flatten(rng if rng is not None else rng_state(device), "rng", tensors),
        **extra,
    }
    # re-saving the same step (e.g. Ctrl-C right after a periodic save) replaces it
    try:
        with atomic.atomic_folder(final, replace=True, tmp=root / f".tmp-step-{int(step)}-{os.getpid()}") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(tmp / FILES[0]))
            save_file(tensors, str(tmp / FILES[1]))
            (tmp / FILES[2]).write_text(json.dumps(state, indent=1))
    except (OSError, SafetensorError) as e:  # ENOSPC, EDQUOT, EIO: safetensors wraps them in its own error
        good = latest(run_dir)
        raise TrainingStopped(f"could not write checkpoint step-{step} ({str(e).strip() or type(e).__name__}); the "
                              f"partial copy was removed. Last good checkpoint: {good or 'none'}. Free disk space, "
                              "then continue with --resume.") from None
    for old in all_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp-*` folder, or a step-N missing a file, is never complete).
    A symlink is not followed: pruning old checkpoints must never delete outside the run folder."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()
             and all((p / f).is_file() for f in FILES)]
    return [p for _, p in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    ckpts = all_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_newest_readable(path: Path, announce: bool = True) -> tuple[Path, tuple[dict, dict, dict]]:
    """(checkpoint, load(checkpoint)) for `path`, or, when `path` is damaged, for the newest older one that reads,
    saying so on stderr: a damaged newest checkpoint costs the steps since the one before, not the run."""
    import sys

    older = [c for c in all_checkpoints(path.parent.parent) if _step(c) < _step(path)]
    try:
        return path, load(path)
    except QloraKitError as first:
        for candidate in reversed(older):
            try:
                loaded = load(candidate)
            except QloraKitError:
                continue
            if announce:
                print(f"{first} Resuming from {candidate} instead.", file=sys.stderr)
            return candidate, loaded
        raise first from None


def _step(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors, optimizer state, the rest of state.json with `rng` restored to tensors)."""
    try:
        state = json.loads((path / FILES[2]).read_text())
        tensors = load_file(str(path / FILES[1]))
        optimizer = _unflatten(state.pop("optimizer"), tensors)
        state["rng"] = _unflatten(state["rng"], tensors)
        return load_file(str(path / FILES[0])), optimizer, state
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # damaged after it was written
        raise QloraKitError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). Move it aside to resume "
                            "from the checkpoint before it.") from None
