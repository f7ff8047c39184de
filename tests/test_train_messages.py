"""What a training run tells its user: the progress bar's validation loss, packed rows called rows, a warning when
warmup outlasts the run, a summary.json that covers a resumed run whole, and a resume command that works without
the qlora-kit script on PATH."""

from __future__ import annotations

import json
import sys

from conftest import tiny_recipe


def test_progress_packing_and_warmup_messages(tiny_model, tiny_data, tmp_path, capsys):
    from qlora_kit.train import loop as train

    r = tiny_recipe(tiny_model, tiny_data, data={"packing": True, "val_fraction": 0.25, "max_length": 128},
                    train={"steps": 3, "warmup_steps": 5, "eval_every": 1})
    train.run(r, tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "val_loss=" in err  # the progress bar shows the latest validation loss
    assert "packed train rows (" in err and " examples)" in err
    assert "warning: train.warmup_steps=5 is not shorter than train.steps=3" in err
    ok = tiny_recipe(tiny_model, tiny_data, train={"steps": 2, "warmup_steps": 1})
    train.run(ok, tmp_path / "ok", progress=False)
    assert "warmup_steps" not in capsys.readouterr().err


def test_summary_after_resume_covers_the_whole_run(tiny_model, tiny_data, tmp_path):
    from qlora_kit.train import loop as train

    full = train.run(tiny_recipe(tiny_model, tiny_data, train={"steps": 4}), tmp_path / "full", progress=False)
    first = train.run(tiny_recipe(tiny_model, tiny_data, train={"steps": 2}), tmp_path / "run", progress=False)
    resumed = train.run(tiny_recipe(tiny_model, tiny_data, train={"steps": 4}), tmp_path / "run", resume=True,
                        progress=False)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == resumed and resumed["steps"] == 4
    assert resumed["tokens"] == full["tokens"] > first["tokens"] > 0  # the same batches, counted once each
    assert resumed["wall_s"] >= first["wall_s"] and "totals_from_step" not in resumed


def test_resume_command_without_the_script_on_path(monkeypatch):
    from qlora_kit.cli import train as cli_train

    monkeypatch.setattr(sys, "argv", ["/somewhere/.venv/bin/qlora-kit", "train"])
    monkeypatch.setattr(cli_train.shutil, "which", lambda name: None)  # venv not activated
    assert cli_train.launcher() == [sys.executable, "-m", "qlora_kit.cli.main"]
    monkeypatch.setattr(cli_train.shutil, "which", lambda name: "/somewhere/.venv/bin/qlora-kit")
    assert cli_train.launcher() == ["qlora-kit"]
    monkeypatch.setattr(cli_train.shutil, "which", lambda name: "/other/bin/qlora-kit")  # another install
    assert cli_train.launcher() == [sys.executable, "-m", "qlora_kit.cli.main"]
