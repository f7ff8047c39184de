"""The `qlora-kit` command end to end on a tiny model: train, inspect, generate, help, exit codes."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_recipe
from qlora_kit.cli.main import main


def _recipe_file(tmp_path, tiny_model, tiny_data, **sections):
    recipe = tiny_recipe(tiny_model, tiny_data, **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, tiny_data):
    tmp = tmp_path_factory.mktemp("cli")
    recipe = _recipe_file(tmp, tiny_model, tiny_data)
    assert main(["train", str(recipe), "--out", str(tmp / "run"), "--no-progress", "--set", "train.steps=3"]) == 0
    return tmp / "run"


def test_train_writes_run_and_set_overrides(tiny_run):
    saved = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert saved["train"]["steps"] == 3  # the --set override is what was run and recorded
    assert (tiny_run / "adapter" / "adapter_model.safetensors").is_file()


def test_inspect_json_for_run_adapter_model(tiny_run, tiny_model, capsys):
    for path, kind in [(tiny_run, "run"), (tiny_run / "adapter", "adapter"), (tiny_model, "model")]:
        assert main(["inspect", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == kind
    assert main(["inspect", str(tiny_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_logged"] == 3


def test_generate_from_run_and_compare_base(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "What is the capital of Veloria 1?", "--max-new-tokens", "5",
                 "--compare-base"]) == 0
    out = capsys.readouterr().out
    assert "base model :" in out and "fine-tuned :" in out


def test_refuses_to_overwrite_run(tiny_run, tmp_path, tiny_model, tiny_data, capsys):
    recipe = _recipe_file(tmp_path, tiny_model, tiny_data)
    before = (tiny_run / "metrics.jsonl").read_bytes()
    assert main(["train", str(recipe), "--out", str(tiny_run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tiny_run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("cmd", [[], ["train"], ["generate"], ["inspect"], ["export"], ["estimate"], ["analyze"]])
def test_help_everywhere(cmd):
    out = subprocess.run([sys.executable, "-m", "qlora_kit.cli.main", *cmd, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Usage:" in out.stdout


def test_bad_input_exit_2_one_line_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 8\n")
    out = subprocess.run([sys.executable, "-m", "qlora_kit.cli.main", "train", str(bad)], capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "lora.rank" in out.stderr and "'r'" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2
