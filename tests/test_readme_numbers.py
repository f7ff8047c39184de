"""The numbers the README and the recipes quote from `qlora-kit estimate` are what the command prints today: each
quoted output line is rerun and compared, so a change to the estimate that moves them fails here until the docs
are regenerated (the estimate is pure arithmetic on config.json: these run in well under a second each)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from qlora_kit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
# recipe -> the built-in config of the model its comment estimates (the recipe itself names a local folder)
RECIPES = {"llama3-8b-24gb.yaml": "llama-3.1-8b", "mistral-7b-16gb.yaml": "mistral-7b",
           "llama3-70b-2x24gb.yaml": "llama-3.1-70b"}


def _run(argv: list[str], capsys) -> list[str]:
    assert main(argv) == 0
    return [line.rstrip() for line in capsys.readouterr().out.splitlines()]


def _readme_blocks() -> list[tuple[str, list[str]]]:
    """(command, the output lines quoted after it) for every `$ qlora-kit estimate` inside a fenced block."""
    blocks, fenced, current = [], False, None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fenced, current = not fenced, None
        elif not fenced:
            continue
        elif line.startswith("$ qlora-kit estimate "):
            current = (line[2:], [])
            blocks.append(current)
        elif line.startswith("$ "):
            current = None
        elif current is not None and line.strip() and line.strip() != "...":
            current[1].append(line.rstrip())
    return blocks


BLOCKS = _readme_blocks()


def test_the_readme_quotes_estimate_outputs():
    assert len(BLOCKS) >= 2 and all(lines for _, lines in BLOCKS)


@pytest.mark.parametrize("command, quoted", BLOCKS, ids=[c for c, _ in BLOCKS])
def test_readme_estimate_output_is_current(command, quoted, capsys):
    out = _run(shlex.split(command)[1:], capsys)
    at = 0
    for line in quoted:  # in order, each exactly as printed
        assert line in out[at:], f"README quotes {line!r}; `{command}` now prints:\n" + "\n".join(out)
        at = out.index(line, at) + 1


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_comment_predictions_are_current(recipe, capsys):
    head = (ROOT / "recipes" / recipe).read_text().split("\nmodel:")[0]
    comment = " ".join(line.lstrip("# ").rstrip("\\ ") for line in head.splitlines())
    command = re.search(r"qlora-kit estimate (--model \S+ .*?--gpu-mem \S+)", comment).group(1)
    argv = ["estimate", *shlex.split(command.replace("--model PATH", f"--model {RECIPES[recipe]}"))]
    if "--model llama-3.1-70b" not in argv:
        argv[argv.index("--model") + 1] = RECIPES[recipe]
    predicted = re.search(r"predicts (\d+\.\d+) GiB", comment).group(1)
    totals = [line for line in _run(argv, capsys) if line.startswith("total")]
    assert totals and f" {predicted} GiB" in totals[0], (recipe, predicted, totals)
