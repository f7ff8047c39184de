"""Security: weights through safetensors; pickle only with --allow-pickle and then weights_only; no model
code runs without --trust-remote-code; recipes through yaml.safe_load; nothing we name escapes the output folder.

Each hostile input tries to create a marker file; the marker's absence is the proof that nothing ran."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from qlora_kit.train import loop as train
from qlora_kit.run import checkpoint
from qlora_kit.cli.main import main

RECIPE = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"max_length": 64},
          "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "save_every": 1,
                    "keep_checkpoints": 1, "device": "cpu"}}


def write_recipe(folder: Path, model: Path, data: Path) -> Path:
    raw = {**RECIPE, "model": {"path": str(model)}, "data": {**RECIPE["data"], "path": str(data)}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return folder / "recipe.yaml"


def cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def files_under(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pickle_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its weights as pytorch_model.bin only (a plain state dict: weights_only accepts it)."""
    folder = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("pickle") / "model"))
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


class RunsCode:
    """Unpickling this calls os.system: what a hostile .bin does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---- recipes --------------------------------------------------------------------------------------------------------


def test_recipe_yaml_cannot_run_code(tmp_path):
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    code, err = cli("train", recipe, "--out", tmp_path / "run")
    assert code == 2 and "not valid YAML" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "run").exists()


# ---- pickle ---------------------------------------------------------------------------------------------------------


def test_pickle_only_model_needs_allow_pickle_and_loads_weights_only(pickle_model, tiny_data, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, pickle_model, tiny_data)
    code, err = cli("train", recipe, "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and "only pickle checkpoints" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()

    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    code, err = cli("train", recipe, "--out", tmp_path / "run", "--no-progress", "--allow-pickle")
    assert code == 0, err
    assert calls == [True]  # the one torch.load of the run: the weights, never an unrestricted unpickle
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["model"]["allow_pickle"] is True  # recorded, so --resume and generate load the same way


def test_inspect_reads_pickle_only_with_the_flag(pickle_model):
    code, err = cli("inspect", pickle_model)
    assert code == 2 and "--allow-pickle" in err and "Traceback" not in err
    code, err = cli("inspect", pickle_model, "--allow-pickle")
    assert code == 0, err


def test_hostile_pickle_is_refused_even_with_allow_pickle(pickle_model, tiny_data, tmp_path):
    marker = tmp_path / "PWNED"
    model = Path(shutil.copytree(pickle_model, tmp_path / "model"))
    torch.save({"model.embed_tokens.weight": RunsCode(f"touch {marker}")}, model / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, model, tiny_data)
    code, err = cli("train", recipe, "--out", tmp_path / "run", "--no-progress", "--allow-pickle")
    assert code == 2, err
    assert "refused" in err and "weights_only=True" in err and "system" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_generate_has_the_same_flags(pickle_model, tmp_path):
    code, err = cli("generate", pickle_model, "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 2 and "--allow-pickle" in err
    code, err = cli("generate", pickle_model, "--prompt", "hello", "--max-new-tokens", "2", "--allow-pickle")
    assert code == 0, err


# ---- remote code --------------------------------------------------------------------------------------------------


@pytest.fixture()
def remote_code_model(tiny_model, tmp_path) -> tuple[Path, Path]:
    """A model folder whose config.json maps to Python files shipped in the folder; importing them leaves a marker."""
    marker = tmp_path / "REMOTE_CODE_RAN"
    folder = Path(shutil.copytree(tiny_model, tmp_path / "remote"))
    (folder / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_model_code_runs_only_with_trust_remote_code(remote_code_model, tiny_data, tmp_path):
    folder, marker = remote_code_model
    recipe = write_recipe(tmp_path, folder, tiny_data)
    for argv in (["train", recipe, "--out", tmp_path / "run", "--no-progress"], ["inspect", folder],
                 ["generate", folder, "--prompt", "hi"]):
        code, err = cli(*argv)
        assert code == 2 and "ships its own model code" in err and "Traceback" not in err, (argv, err)
        assert not marker.exists(), argv
    assert "--trust-remote-code" in err
    # With the flag the folder's code runs (in a child process, so its module cache goes to tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    res = subprocess.run([sys.executable, "-m", "qlora_kit.cli.main", "train", str(recipe),
                          "--out", str(tmp_path / "run"), "--no-progress", "--trust-remote-code",
                          "--set", "train.steps=1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert marker.exists()
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["model"]["trust_remote_code"] is True


# ---- output names ---------------------------------------------------------------------------------------------------


def test_a_run_writes_only_inside_its_folder(tiny_model, tiny_data, tmp_path):
    """Everything train derives a name for (recipe.yaml, metrics, checkpoints/step-N, adapter, summary) lands in
    --out: the rest of the tree, the model and the data are untouched."""
    recipe = write_recipe(tmp_path, tiny_model, tiny_data)
    before = [files_under(tmp_path), files_under(tiny_model.parent), files_under(tiny_data.parent)]
    code, err = cli("train", recipe, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    after = files_under(tmp_path)
    created = sorted(Path(p).relative_to(tmp_path).parts[0] for p in set(after) - set(before[0]))
    assert set(created) == {"run"}
    assert {p: v for p, v in after.items() if not p.startswith(str(tmp_path / "run"))} == before[0]
    assert [files_under(tiny_model.parent), files_under(tiny_data.parent)] == before[1:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "adapter", "checkpoints", "metrics.jsonl", "recipe.yaml", "summary.json"]


def test_a_symlinked_checkpoint_is_never_followed(tiny_model, tiny_data, tmp_path, capsys):
    """A step-N that links outside the run (planted, or a copied run) is neither resumed from nor pruned."""
    from conftest import tiny_recipe

    outside = tmp_path / "precious"
    outside.mkdir()
    for name in checkpoint.FILES:
        (outside / name).write_text("not yours")
    run_dir = tmp_path / "run"
    r = tiny_recipe(tiny_model, tiny_data, train={"steps": 2, "save_every": 1, "keep_checkpoints": 1})
    train.run(r, run_dir, progress=False)
    (run_dir / "checkpoints" / "step-999").symlink_to(outside, target_is_directory=True)
    assert checkpoint.latest(run_dir).name == "step-2"
    r4 = tiny_recipe(tiny_model, tiny_data, train={"steps": 4, "save_every": 1, "keep_checkpoints": 1})
    train.run(r4, run_dir, resume=True, progress=False)  # saves and prunes twice
    assert "resuming from" in capsys.readouterr().err and checkpoint.latest(run_dir).name == "step-4"
    assert sorted(p.name for p in outside.iterdir()) == sorted(checkpoint.FILES)


def test_checkpoint_names_come_from_the_step_number_only(tmp_path):
    a = {"m.lora_A.weight": torch.zeros(2, 2)}
    path = checkpoint.save(tmp_path, 7, a, {"x": torch.ones(1)}, {"data": {}, "skipped": 0}, keep=2)
    assert path == tmp_path / "checkpoints" / "step-7" and path.resolve().parent == (tmp_path / "checkpoints").resolve()
    with pytest.raises((TypeError, ValueError)):  # a string step (e.g. '../x') is not turned into a folder name
        checkpoint.save(tmp_path, "../../escape", a, {}, {"data": {}, "skipped": 0}, keep=2)
    assert not (tmp_path.parent / "escape").exists() and sorted(os.listdir(tmp_path)) == ["checkpoints"]


def test_adapter_tensor_names_are_not_paths(tiny_model, tmp_path):
    """Names inside an adapter file are module names, never file names: a hostile one is refused, nothing written."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"],
                                                             "base_model_name_or_path": str(tiny_model)}))
    evil = "base_model.model.../../../escaped"
    save_file({f"{evil}.lora_A.weight": torch.zeros(2, 64), f"{evil}.lora_B.weight": torch.zeros(64, 2)},
              str(adapter / "adapter_model.safetensors"))
    before = files_under(tmp_path)
    for fmt in ("adapter", "merged"):
        code, err = cli("export", adapter, "--format", fmt, "--out", tmp_path / f"out-{fmt}", "--no-progress")
        assert code == 2 and "does not fit the base" in err and "Traceback" not in err, err
    assert files_under(tmp_path) == before and not list(tmp_path.parent.glob("escaped*"))
