"""`pytest -m gpu` on a machine without CUDA exits non-zero with a message; a plain run skips the GPU tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")
def test_gpu_run_without_cuda_fails_and_plain_run_skips():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    gpu = subprocess.run([*cmd, "-m", "gpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert gpu.returncode != 0, gpu.stdout
    assert "no CUDA GPU is visible" in gpu.stdout + gpu.stderr
    plain = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout[-2000:]
    assert "skipped" in plain.stdout and "passed" not in plain.stdout
