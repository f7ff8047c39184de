"""A property test of the whole command line: hypothesis draws a command (train, generate, eval, inspect, export,
estimate, analyze, bench), its arguments (types, sizes, odd numbers, empty strings, unknown options), and for train
a recipe and a data file (formats, encodings, missing and extra fields). Every case runs in-process through
`qlora_kit.cli.main.main` and must:

- exit 0 or 2 (an exception escaping main is a traceback: exit 1);
- print no traceback, on stdout or stderr;
- under --json (and train's summary) with exit 0, print stdout that parses as JSON;
- change no file outside the case's output folder (inputs, the model, the trained run, the working folder).

Most cases fail validation fast; a valid train is capped at 1 step of 2 short examples. The outcome counts (command,
exit code) are printed at the end (pytest -s) for the record."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FACTS, write_jsonl
from qlora_kit.cli.main import main

OUTCOMES: Counter = Counter()
CASES = int(os.environ.get("QLORA_KIT_CLI_CASES", "240"))
TINY = {"model": {}, "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "data": {"max_length": 40},
        "train": {"steps": 1, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "save_every": 0, "device": "cpu",
                  "num_threads": 1}}
ODD = ["", " ", "0", "-1", "1", "2", "3", "nan", "inf", "-inf", "1e15", "99999999999999999999", "0.5", "abc",
       "\u00e9", "\ud800", "../x", "--json", "=", "a=b", "[", "{", "true", "null"]
text = st.text(max_size=12)
odd = st.one_of(st.sampled_from(ODD), text.filter(lambda s: "\x00" not in s))


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """The inputs every case may point at: the tiny model, a trained run, its adapter, data files."""
    root = tmp_path_factory.mktemp("cli-property")
    data = write_jsonl(root / "facts.jsonl", FACTS[:4])
    recipe = root / "base.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "model": {"path": str(tiny_model)},
                                      "data": {**TINY["data"], "path": str(data)}}))
    run = root / "run"
    assert main(["train", str(recipe), "--out", str(run), "--no-progress"]) == 0
    (root / "notes.txt").write_bytes(b"\xff\xfe not a model")
    return {"model": tiny_model, "run": run, "adapter": run / "adapter", "data": data, "recipe": recipe,
            "notes": root / "notes.txt", "missing": root / "no-such-thing", "root": root}


def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    files = {}
    for root in roots:
        for p in [root] if root.is_file() else root.rglob("*") if root.exists() else []:
            if skip is not None and (p == skip or skip in p.parents):
                continue
            if p.is_file() or p.is_symlink():
                st_ = p.lstat()
                files[str(p)] = (st_.st_size, st_.st_mtime_ns)
    return files


# ---- drawing a case ------------------------------------------------------------------------------------------------


def _record(draw) -> str:
    kind = draw(st.sampled_from(["alpaca"] * 6 + ["chat", "text", "sharegpt", "completion", "extra", "missing",
                                                  "junk", "wrongtype"]))
    t = st.text(min_size=1, max_size=15)
    if kind == "alpaca":
        return json.dumps({"instruction": draw(t), "output": draw(t)})
    if kind == "chat":
        return json.dumps({"messages": [{"role": "user", "content": draw(t)}, {"role": "assistant",
                                                                                "content": draw(t)}]})
    if kind == "text":
        return json.dumps({"text": draw(t)})
    if kind == "sharegpt":
        return json.dumps({"conversations": [{"from": "human", "value": draw(t)}, {"from": "gpt", "value": draw(t)}]})
    if kind == "completion":
        return json.dumps({"prompt": draw(t), "completion": draw(t)})
    if kind == "extra":
        return json.dumps({"instruction": draw(t), "output": draw(t), draw(st.text(max_size=5)): draw(t)})
    if kind == "missing":
        return json.dumps({"instruction": draw(t)})
    if kind == "wrongtype":
        return json.dumps({"instruction": draw(st.integers()), "output": [draw(t)]})
    return draw(st.text(max_size=20).filter(lambda s: "\n" not in s))


@st.composite
def data_file(draw, folder: Path) -> Path:
    lines = [_record(draw) for _ in range(draw(st.integers(0, 5)))]
    suffix = draw(st.sampled_from([".jsonl"] * 5 + [".json", ".csv", ".txt"]))
    if suffix == ".json":
        body = "[" + ",".join(lines) + "]"
    elif suffix == ".csv":
        body = "instruction,output\n" + "".join(f"{draw(text)},{draw(text)}\n" for _ in range(len(lines)))
    else:
        body = "\n".join(lines) + "\n"
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "latin-1"]))
    path = folder / f"data{suffix}"
    path.write_bytes(body.encode(encoding, errors="replace"))
    return path


@st.composite
def recipe_file(draw, folder: Path, world: dict, out: Path) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["model"]["path"] = str(draw(st.sampled_from([world["model"]] * 4 + [world["missing"], world["run"]])))
    raw["data"]["path"] = str(draw(data_file(folder)) if draw(st.integers(0, 2)) else world["data"])
    raw["output"] = {"dir": str(out)}
    for _ in range(draw(st.integers(0, 3))):  # mostly wrong: a valid recipe costs a real (1-step) training run
        section = draw(st.sampled_from(["model", "quant", "lora", "ia3", "data", "train", "output", "nosuch"]))
        key = draw(st.sampled_from(["r", "steps", "batch_size", "grad_accum", "max_length", "format", "type",
                                    "outputs", "targets", "lr", "path", "nosuch", "dir", "compute_dtype"]))
        value = draw(st.one_of(odd, st.integers(-5, 10**13), st.floats(), st.lists(text, max_size=3),
                               st.dictionaries(text, text, max_size=2), st.none()))
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][key] = value
    body = yaml.safe_dump(raw, allow_unicode=True)
    if draw(st.integers(0, 12)) == 0:
        body = draw(st.sampled_from(["a: &a [*a]", "[" * 3000, "train: {steps: 1", "- 1\n- 2", "\t:", ""]))
    path = folder / "recipe.yaml"
    path.write_bytes(body.encode("utf-8", errors="surrogatepass"))
    return path


@st.composite
def case(draw, world: dict, folder: Path) -> list[str]:
    out = folder / "out"
    command = draw(st.sampled_from(["train"] * 4 + ["generate", "eval", "inspect", "export", "estimate", "analyze",
                                                    "bench"] * 2))
    source = str(draw(st.sampled_from([world["model"], world["run"], world["adapter"], world["data"],
                                       world["notes"], world["missing"]])))
    extra = draw(st.lists(st.sampled_from(["--json", "--nosuch", "--allow-pickle", "-h"]), max_size=1))
    if command == "train":
        argv = ["train", str(draw(recipe_file(folder, world, out))), "--no-progress"]
        argv += draw(st.sampled_from([["--out", str(out)], [], ["--out", ""], ["--out", str(out), "--resume"]]))
        for _ in range(draw(st.integers(0, 2))):
            argv += ["--set", draw(st.sampled_from(["train.steps=", "lora.r=", "data.format=", "x.y=", "train.lr="]))
                     + draw(odd)]
        return argv + [e for e in extra if e != "--json"]
    if command == "generate":
        argv = ["generate", source, "--prompt", draw(odd), "--max-new-tokens", draw(st.sampled_from(["1", "2", "0",
                                                                                                    "x"]))]
        argv += draw(st.sampled_from([[], ["--raw"], ["--temperature", draw(odd)], ["--quant", draw(odd)],
                                      ["--compare-base"], ["--adapter", draw(odd)]]))
    elif command == "eval":
        argv = ["eval", source, "--no-progress", "--max-examples", draw(st.sampled_from(["1", "2", "0", "x"]))]
        argv += draw(st.sampled_from([[], ["--data", str(draw(data_file(folder)))], ["--data", str(world["data"])],
                                      ["--data", draw(odd)]]))
        argv += draw(st.sampled_from([[], ["--format", draw(odd)], ["--format", "alpaca"], ["--max-length", draw(odd)],
                                      ["--json"]]))
    elif command == "inspect":
        argv = ["inspect", source] + draw(st.sampled_from([[], ["--json"]]))
    elif command == "export":
        argv = ["export", source, "--format", draw(st.sampled_from(["adapter", "merged", "gguf", "nosuch", ""])),
                "--out", draw(st.sampled_from([str(out / "x"), "", str(world["run"])]))]
        argv += draw(st.sampled_from([[], ["--gguf-type", draw(odd)], ["--gguf-type", "q8_0"]]))
    elif command == "estimate":
        argv = ["estimate", "--model", draw(st.sampled_from([str(world["model"]), "smollm2-135m", draw(odd)]))]
        for opt in draw(st.lists(st.sampled_from(["--seq", "--batch", "--rank", "--gpus", "--gpu-mem", "--quant",
                                                  "--mlp-chunk", "--targets", "--loss-chunk"]), max_size=3)):
            argv += [opt, draw(odd)]
        argv += draw(st.sampled_from([[], ["--json"]]))
    elif command == "analyze":
        argv = ["analyze", source] + draw(st.sampled_from([[], ["--json"], ["--no-base"], ["--modules", draw(odd)],
                                                           ["--plot", str(out / "plots")]]))
    else:
        argv = ["bench", draw(st.sampled_from(["--nosuch", "-h", "memory"])), draw(st.sampled_from(["--nosuch", "-h"]))]
    return argv + extra


# ---- the property --------------------------------------------------------------------------------------------------


@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_every_command_exits_0_or_2_without_traceback_and_writes_only_its_output(world, data):
    folder = Path(tempfile.mkdtemp(dir=world["root"], prefix="case-"))
    threads, cwd = torch.get_num_threads(), os.getcwd()
    try:
        argv = data.draw(case(world, folder))
        outside = [world["model"], world["run"], world["data"], world["recipe"], world["notes"], folder]
        before = snapshot(*outside, skip=folder / "out")
        out, err = io.StringIO(), io.StringIO()
        os.chdir(folder)  # anything written relative to the working folder is caught by the snapshot
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # never expected: main returns its code
                code = f"SystemExit({e.code})"
        OUTCOMES[(argv[0], code)] += 1
        printed = out.getvalue() + err.getvalue()
        note = f"argv={argv!r}\nstderr={err.getvalue()[-3000:]}"
        assert code in (0, 2), note
        assert "Traceback (most recent call last)" not in printed, note
        if code == 0 and ("--json" in argv or argv[0] == "train") and "-h" not in argv:
            lines = out.getvalue().strip().splitlines()
            assert lines and json.loads(lines[-1] if argv[0] == "train" else out.getvalue()) is not None, note
        assert snapshot(*outside, skip=folder / "out") == before, note
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        shutil.rmtree(folder, ignore_errors=True)


def test_zz_print_outcomes():
    """The counts of the property test above (runs after it in this file): pytest -s shows them."""
    if OUTCOMES:
        rows = sorted(OUTCOMES.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
        print("\ncli property cases:", sum(OUTCOMES.values()), {f"{c} exit {e}": n for (c, e), n in rows})
