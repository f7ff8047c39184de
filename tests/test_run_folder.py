"""One run per folder, and folders a crash leaves behind: the run-folder lock (a second `train` refused with the
holder's pid, a dead holder's lock taken over, released on every exit), the debris of a kill before recipe.yaml,
resuming past train.steps, a damaged newest checkpoint, a link named adapter/, and what stop messages name."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe
from qlora_kit import atomic
from qlora_kit.cli.main import main
from qlora_kit.errors import ConfigError, QloraKitError
from qlora_kit.run import checkpoint
from qlora_kit.run.lock import LOCK_NAME, RunLock
from qlora_kit.train import loop as train

HOLD = ("import sys; from qlora_kit.run.lock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
        "print('locked', flush=True); sys.stdin.read(); lock.release()")


def write_recipe(folder: Path, model: Path, data: Path, **train_keys) -> Path:
    raw = {"model": {"path": str(model)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "data": {"path": str(data), "max_length": 64},
           "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "save_every": 1, "device": "cpu",
                     **train_keys}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_train_into_a_locked_folder_exits_2_naming_the_holder(tiny_model, tiny_data, tmp_path, capsys):
    recipe, run_dir = write_recipe(tmp_path, tiny_model, tiny_data), tmp_path / "run"
    proc = holder(run_dir)
    try:
        for extra in ([], ["--resume"]):
            assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress", *extra]) == 2
            err = capsys.readouterr().err
            assert f"in use by another `qlora-kit train` (pid {proc.pid})" in err and "Traceback" not in err, err
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing written beside the holder's lock
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert not run_dir.exists()  # the holder made the folder and, ending, removed it with its lock
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 0  # free again
    assert not (run_dir / LOCK_NAME).exists()  # released at the end of the run


def test_a_dead_holders_lock_is_taken_over_and_said(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    proc.send_signal(signal.SIGKILL)  # no cleanup: the lock file stays, with the dead pid in it
    proc.wait(timeout=30)
    assert (run_dir / LOCK_NAME).read_text().strip() == str(proc.pid)
    with RunLock(run_dir):
        assert (run_dir / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert f"taking over the lock of pid {proc.pid}, which is no longer running" in capsys.readouterr().err
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):  # a second holder, even in this process
            RunLock(run_dir).acquire()
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_released_when_the_run_fails_and_when_it_stops(tiny_model, tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    r = tiny_recipe(tiny_model, tiny_data, train={"steps": 3, "save_every": 0})

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train.run(r, run_dir, progress=False)
    monkeypatch.undo()
    assert not (run_dir / LOCK_NAME).exists()
    bad = tiny_recipe(tiny_model, tmp_path / "no-such.jsonl")
    with pytest.raises(QloraKitError):  # refused after locking, before writing: no folder is left
        train.run(bad, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()


def test_other_ranks_of_one_launch_do_not_take_the_lock(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Only global rank 0 locks: the other ranks of the same torchrun launch never contend with it."""
    taken = []
    monkeypatch.setattr(RunLock, "acquire", lambda self: taken.append(self.run_dir))
    monkeypatch.setattr(train, "_run_locked", lambda *a, **k: None)

    train.run(tiny_recipe(tiny_model, tiny_data), tmp_path / "run", world=train.World(rank=1))
    assert taken == []
    train.run(tiny_recipe(tiny_model, tiny_data), tmp_path / "run")
    assert taken == [tmp_path / "run"]


def test_folder_killed_before_recipe_yaml_is_accepted_by_a_fresh_train(tiny_model, tiny_data, tmp_path, capsys):
    """SIGKILL between writing `.recipe.yaml.tmp-PID` and its rename leaves only that (and a stale lock)."""
    recipe, run_dir = write_recipe(tmp_path, tiny_model, tiny_data), tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".recipe.yaml.tmp-999999").write_text("model: {path: x")
    (run_dir / LOCK_NAME).write_text("999999\n")
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "killed before it wrote recipe.yaml" in err and "Drop --resume" in err, err
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 0, capsys.readouterr().err
    assert not list(run_dir.glob(".*tmp-*")) and (run_dir / "adapter").is_dir()


def test_resume_with_fewer_steps_than_done_is_refused(tiny_model, tiny_data, tmp_path, capsys):
    recipe, run_dir = write_recipe(tmp_path, tiny_model, tiny_data, steps=3), tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["train", str(recipe), "--out", str(run_dir), "--no-progress", "--resume"]
    assert main([*argv, "--set", "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "at step 3, past train.steps 2" in err and "--set train.steps=N with N > 3" in err, err
    assert main([*argv, "--set", "train.steps=4"]) == 0  # more steps: trains on
    assert "step 3 of 4" in capsys.readouterr().err


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_model, tiny_data, tmp_path, capsys):
    # a constant lr: a run stopped at step 3 of 3 then continued to 4 is the 4-step run
    recipe = write_recipe(tmp_path, tiny_model, tiny_data, steps=4, schedule="constant", num_threads=1)
    run_dir = tmp_path / "run"
    ref = tmp_path / "ref"
    assert main(["train", str(recipe), "--out", str(ref), "--no-progress"]) == 0
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress", "--set", "train.steps=3"]) == 0
    newest = checkpoint.latest(run_dir)
    assert newest.name == "step-3"
    (newest / "optimizer.safetensors").write_bytes(b"\x00" * 40)  # damaged after it was written
    capsys.readouterr()
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {newest} cannot be read" in err and "Resuming from" in err and "step-2" in err, err
    a = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)  # steps 3-4 ran again from step 2: the same end


def test_adapter_link_is_replaced_not_written_through(tiny_model, tiny_data, tmp_path):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    r = tiny_recipe(tiny_model, tiny_data, train={"steps": 1, "save_every": 0})
    train.run(r, run_dir, progress=False)
    atomic.remove(run_dir / "adapter")
    (run_dir / "adapter").symlink_to(elsewhere)
    train.run(r, run_dir, resume=True, progress=False)  # at step 1 of 1: writes the adapter again
    assert not (run_dir / "adapter").is_symlink() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_nonfinite_stop_before_any_checkpoint_offers_none(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    recipe, run_dir = write_recipe(tmp_path, tiny_model, tiny_data, steps=3, save_every=0), tmp_path / "run"
    monkeypatch.setattr(train, "train_step", lambda *a, **k: train.StepResult(float("nan"), 1, float("nan"), False))
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Last good checkpoint" not in err and "No checkpoint was written yet" in err and "--resume" in err, err


def test_disk_full_names_the_file(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    recipe, run_dir = write_recipe(tmp_path, tiny_model, tiny_data), tmp_path / "run"
    real_open = open

    def full(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    assert main(["train", str(recipe), "--out", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"No space left on device ({run_dir / 'metrics.jsonl'})" in err, err
