"""`qlora-kit --help` is fast: the command list is printed without importing any command (so no torch,
transformers or bitsandbytes); each command still loads and shows its own help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlora_kit.cli.main import COMMANDS, main

PROBE = """
import sys
from qlora_kit.cli.main import main
code = main(["--help"])
heavy = sorted(m for m in ("torch", "transformers", "bitsandbytes", "safetensors", "numpy") if m in sys.modules)
print("HEAVY", heavy)
sys.exit(code)
"""


def test_help_imports_no_torch():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout
    for name in COMMANDS:
        assert f"  {name} " in r.stdout, name  # every command listed, with its summary


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_loads_and_shows_its_help(name, capsys):
    assert main([name, "--help"]) == 0
    assert "Usage: qlora-kit " + name in capsys.readouterr().out


def test_an_unknown_command_is_a_usage_error(capsys):
    assert main(["trian"]) == 2
    assert "No such command" in capsys.readouterr().err
