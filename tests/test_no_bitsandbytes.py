"""Where bitsandbytes cannot be imported: plain LoRA (quant.type none) still trains; nf4 is exit 2 with the fix."""

import os
import subprocess
import sys

import yaml

from conftest import tiny_recipe


def _run(tmp_path, tiny_model, tiny_data, quant_type):
    broken = tmp_path / "broken"
    (broken / "bitsandbytes").mkdir(parents=True)
    (broken / "bitsandbytes" / "__init__.py").write_text("raise ImportError('simulated: no CUDA/CPU backend')\n")
    recipe = tmp_path / f"{quant_type}.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model, tiny_data, quant={"type": quant_type},
                                                 train={"steps": 1}).to_dict()))
    env = {**os.environ, "PYTHONPATH": f"{broken}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli.main", "train", str(recipe), "--out",
                           str(tmp_path / f"run-{quant_type}"), "--no-progress"], capture_output=True, text=True,
                          env=env)


def test_plain_lora_trains_without_bitsandbytes(tmp_path, tiny_model, tiny_data):
    out = _run(tmp_path, tiny_model, tiny_data, "none")
    assert out.returncode == 0, out.stderr[-2000:]


def test_quantization_without_bitsandbytes_is_a_clear_error(tmp_path, tiny_model, tiny_data):
    out = _run(tmp_path, tiny_model, tiny_data, "nf4")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "bitsandbytes" in out.stderr and "quant.type=none" in out.stderr
