"""On the CPU, what qlora-kit prints to stderr is its own: no bitsandbytes or transformers notice a user would take
for an error (bitsandbytes' hub-kernel fetch on AVX512-BF16 CPUs, deprecation warnings, "Failed to load ...").
Commands that load a pre-quantized base (bitsandbytes on the path) and a quantized export, run as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from test_prequant import _prequantized

NOISE = re.compile(r"Failed to load|kernels-community|publisher trust|gemm_4bit|Traceback|FutureWarning|UserWarning|"
                   r"DeprecationWarning|deprecated|bitsandbytes|`torch_dtype`|generation flags", re.IGNORECASE)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"HF_HUB_OFFLINE": "1"}  # as a user runs
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_commands_print_no_library_noise(tmp_path, tiny_data):
    _, pre = _prequantized(tmp_path, "nf4")
    runs = [
        _cli("generate", str(pre), "--prompt", "What is the capital of Veloria?", "--max-new-tokens", "3",
             "--device", "cpu", "--quant", "nf4"),
        _cli("eval", str(pre), "--data", str(tiny_data), "--format", "alpaca", "--quant", "nf4", "--device", "cpu",
             "--no-progress"),
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
        noise = [line for line in r.stderr.splitlines() if NOISE.search(line)]
        assert not noise, (r.args[3:5], noise)
