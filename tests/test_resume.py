"""Interruption and resume: SIGKILL at a random step, Ctrl-C/SIGTERM, atomic checkpoints, keep-K, non-finite
losses, a full disk. A resumed run must end with the adapter of an uninterrupted run, bitwise, on the CPU.

Real processes where a real signal matters (SIGKILL, SIGINT); everything else in-process with tiny models."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import tiny_recipe
from qlora_kit.train import loop as train
from qlora_kit.run import checkpoint
from qlora_kit.cli.main import main
from qlora_kit.train.loss import CausalLMLoss
from qlora_kit.run.folder import read_metrics

STEPS = 10
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_recipe(folder: Path, model: Path, data: Path, **train_keys) -> Path:
    """Dropout on, so the RNG state matters; one thread, so the CPU sums in the same order in every process."""
    raw = {"model": {"path": str(model)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
           "data": {"path": str(data), "max_length": 64},
           "train": {"steps": STEPS, "batch_size": 2, "lr": 1e-2, "warmup_steps": 2, "save_every": 1,
                     "keep_checkpoints": 2, "device": "cpu", "num_threads": 1, "seed": 3, **train_keys}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora_kit.cli.main", "train", str(recipe), "--out", str(out), "--no-progress",
            *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Poll metrics.jsonl (the run's own record of progress) until it shows `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before step {step}: rc={proc.returncode}\n{proc.stderr.read()}")
        time.sleep(0.001)
    proc.kill()
    pytest.fail(f"step {step} never appeared in {run_dir}/metrics.jsonl")


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_bitwise_equal(run_dir: Path, reference: Path) -> None:
    a, b = adapter(run_dir), adapter(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} adapter tensors differ from the uninterrupted run, e.g. {different[:2]}"
    # the logged losses of every step agree too: the resumed steps saw the same batches, dropout masks and lr
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in read_metrics(run_dir)] == \
        [[r[k] for k in keys] for r in read_metrics(reference)]


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_data, tmp_path_factory):
    """An uninterrupted run of the same recipe and seed: (recipe path, run folder, the running process)."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(folder, tiny_model, tiny_data)
    proc = start(train_cmd(recipe, folder / "run"))  # runs beside the tests that use it; awaited by `finished`
    return recipe, folder / "run", proc


def finished(reference) -> Path:
    recipe, run_dir, proc = reference
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return run_dir


def wait_for_checkpoint_write(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Busy-poll (a checkpoint takes milliseconds) until checkpoint `step` is being written, or is written."""
    root, deadline = run_dir / "checkpoints", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            continue
        if f"step-{step}" in names or any(n.startswith(f".tmp-step-{step}-") for n in names):
            return
    pytest.fail(f"checkpoint {step} never appeared (rc={proc.poll()})")


def resume_in_process(argv: list[str], capsys) -> str:
    """`qlora-kit train ... --resume` through the CLI in this process (saves a process start); the recipe sets one
    thread, as in the subprocesses, and the test process gets its thread count back afterwards."""
    threads = torch.get_num_threads()
    try:
        capsys.readouterr()
        assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().err


def test_sigkill_twice_at_random_steps_then_resume_is_bitwise_identical(reference, tmp_path, capsys):
    """Killed while a checkpoint is being written, resumed, killed again just after a step, resumed to the end."""
    recipe = reference[0]
    seed = int(os.environ.get("QLORA_KIT_KILL_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    first = rng.randint(1, STEPS // 2)
    second = rng.randint(first + 1, STEPS - 1)
    note = f"(SIGKILL in checkpoint {first}, then after step {second}; rerun with QLORA_KIT_KILL_SEED={seed})"
    run_dir = tmp_path / "run"

    proc = start(train_cmd(recipe, run_dir))
    wait_for_checkpoint_write(proc, run_dir, first)  # checkpoints/.tmp-step-N-PID is being filled (usually)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, note

    proc = start(train_cmd(recipe, run_dir, "--resume"))
    wait_for_step(proc, run_dir, second)  # metrics.jsonl shows the step: its checkpoint is about to be written
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and ("resuming from" in err or "starting from step 0" in err), note
    assert not (run_dir / "adapter").exists(), note

    err = resume_in_process(["train", str(recipe), "--out", str(run_dir), "--resume"], capsys)
    assert "resuming from" in err, note
    assert_bitwise_equal(run_dir, finished(reference))
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), note


def test_sigint_saves_a_checkpoint_prints_the_resume_command_and_exits_130(reference, tmp_path, capsys):
    recipe = reference[0]
    run_dir = tmp_path / "run"
    proc = start(train_cmd(recipe, run_dir, "--set", "train.log_every=1"))
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    stopped_at = int(err.split("checkpoint saved in ")[1].split("step-")[1].split(".")[0])
    assert 3 <= stopped_at < STEPS and checkpoint.latest(run_dir).name == f"step-{stopped_at}"
    command = shlex.split(err.split("Resume with: ")[1].strip().splitlines()[0])
    # launched as `python -m qlora_kit.cli.main` (no qlora-kit script involved): resumed the same way
    assert command[:5] == [sys.executable, "-m", "qlora_kit.cli.main", "train", str(recipe)]
    assert command[-1] == "--resume"
    assert command[command.index("--out") + 1] == str(run_dir) and "train.log_every=1" in command
    err = resume_in_process(command[3:], capsys)  # the printed command, as the user would paste it
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{stopped_at}'}" in err
    assert_bitwise_equal(run_dir, finished(reference))


def test_sigterm_in_process_checkpoints_and_exits_130(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    real, steps, before = train.train_step, [0], signal.getsignal(signal.SIGTERM)

    def step_then_sigterm(*a, **k):
        res = real(*a, **k)
        steps[0] += 1
        if steps[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill PID` or a cluster's preemption sends
        return res

    monkeypatch.setattr(train, "train_step", step_then_sigterm)
    recipe = write_recipe(tmp_path, tiny_model, tiny_data, num_threads=0)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 2" in err and "--resume" in err and "Traceback" not in err
    assert "error:" not in err  # a stop that was asked for and checkpointed is no error
    assert checkpoint.latest(tmp_path / "run").name == "step-2"
    assert signal.getsignal(signal.SIGTERM) == before  # our handler is removed again


def test_partial_and_incomplete_checkpoints_are_never_picked_up(tiny_model, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    r = tiny_recipe(tiny_model, tiny_data, train={"steps": 6, "save_every": 2, "keep_checkpoints": 5})
    train.run(r, run_dir, progress=False)
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in checkpoint.all_checkpoints(run_dir)] == ["step-2", "step-4", "step-6"]
    # What a crash mid-save leaves (a .tmp folder with some files), and a step folder missing a file
    (ckpts / ".tmp-step-8-12345").mkdir()
    (ckpts / ".tmp-step-8-12345" / "adapter_model.safetensors").write_bytes(b"partial")
    for name in ("step-6", "step-99"):
        (ckpts / name).mkdir(exist_ok=True)
    (ckpts / "step-6" / "state.json").unlink()
    (ckpts / "step-99" / "adapter_model.safetensors").write_bytes(b"x")
    assert checkpoint.latest(run_dir).name == "step-4"
    r8 = tiny_recipe(tiny_model, tiny_data, train={"steps": 8, "save_every": 2, "keep_checkpoints": 5})
    summary = train.run(r8, run_dir, resume=True, progress=False)
    assert summary["steps"] == 8
    assert f"resuming from {ckpts / 'step-4'} (step 4 of 8)" in capsys.readouterr().err
    assert not list(ckpts.glob(".tmp-*"))  # the next save removed the partial one
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))  # steps 5-6 logged once, not twice


def test_only_the_last_k_checkpoints_are_kept(tiny_model, tiny_data, tmp_path):
    r = tiny_recipe(tiny_model, tiny_data, train={"steps": 5, "save_every": 1, "keep_checkpoints": 3})
    train.run(r, tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-3", "step-4", "step-5"]


def nan_loss_at(monkeypatch, calls: set[int]):
    """Make the loss NaN at the given forward calls (1-based; one per step here), with a NaN gradient to match."""
    real, count = CausalLMLoss.forward, [0]

    def forward(self, *a, **k):
        count[0] += 1
        loss, n = real(self, *a, **k)
        return (loss * float("nan"), n) if count[0] in calls else (loss, n)

    monkeypatch.setattr(CausalLMLoss, "forward", forward)


def test_nonfinite_loss_stops_naming_the_step_and_last_checkpoint(tiny_model, tiny_data, tmp_path, monkeypatch,
                                                                  capsys):
    nan_loss_at(monkeypatch, {3})
    recipe = write_recipe(tmp_path, tiny_model, tiny_data, steps=6, save_every=2, num_threads=0)
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 3" in err and "Traceback" not in err
    assert f"Last good checkpoint: {run_dir / 'checkpoints' / 'step-2'}" in err
    assert "train.on_nonfinite=skip" in err and "--resume" in err
    assert checkpoint.latest(run_dir).name == "step-2" and not (run_dir / "adapter").exists()
    # The advice works: resuming with the skip option finishes, and the step-2 weights were not touched by NaN
    monkeypatch.undo()
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress", "--resume",
                 "--set", "train.on_nonfinite=skip"]) == 0


def test_skip_option_skips_and_counts_nonfinite_batches(tiny_model, tiny_data, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {2, 4})
    r = tiny_recipe(tiny_model, tiny_data, train={"steps": 5, "on_nonfinite": "skip"})
    summary = train.run(r, tmp_path / "run", progress=False)
    assert summary["steps"] == 5 and summary["skipped_batches"] == 2
    metrics = read_metrics(tmp_path / "run")
    assert [m["skipped"] for m in metrics] == [0, 1, 1, 2, 2]
    assert metrics[1]["loss"] is None  # NaN is logged as null: metrics.jsonl stays strict JSON
    json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])  # no bare NaN token
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "run").values())


def test_disk_full_while_checkpointing_keeps_the_last_good_one(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    real, calls = checkpoint.save_file, [0]

    def save_file(tensors, path, *a, **k):  # the 2nd checkpoint's optimizer file hits a full disk
        calls[0] += 1
        if calls[0] == 4:
            real(tensors, path, *a, **k)  # half written, as a real ENOSPC leaves it
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    recipe = write_recipe(tmp_path, tiny_model, tiny_data, steps=6, save_every=2, num_threads=0)
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint step-4" in err and "No space left on device" in err
    assert f"Last good checkpoint: {run_dir / 'checkpoints' / 'step-2'}" in err and "--resume" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]  # no partial step-4 left
    monkeypatch.undo()  # space freed
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress", "--resume"]) == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_disk_full_writing_metrics_is_exit_2_with_advice(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    import qlora_kit.run.folder as rd

    def full(run_dir, record):
        raise OSError(28, "No space left on device", str(run_dir / "metrics.jsonl"))

    monkeypatch.setattr(rd, "write_metrics_line", full)
    recipe = write_recipe(tmp_path, tiny_model, tiny_data, steps=2, num_threads=0)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err


def test_resume_before_the_first_checkpoint_starts_over(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    r = tiny_recipe(tiny_model, tiny_data, train={"steps": 3, "save_every": 0})

    def crash(*a, **k):  # dies after the run folder exists, before any checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train.run(r, run_dir, progress=False)
    monkeypatch.undo()
    assert (run_dir / "recipe.yaml").is_file() and checkpoint.latest(run_dir) is None
    summary = train.run(r, run_dir, resume=True, progress=False)
    assert summary["steps"] == 3 and "no complete checkpoint yet: starting from step 0" in capsys.readouterr().err


def test_resume_refuses_a_changed_model_section_and_changes_nothing(tiny_model, tiny_data, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_model, tiny_data, steps=2, num_threads=0)
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress", "--resume", "--set", "lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert "'lora' section differs" in err and "Traceback" not in err
    assert before == {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 2  # no --resume: never overwrite
    assert "already exists" in capsys.readouterr().err

