"""Bad input, a matrix with one test per row: every row exits 2 with a message that says what is wrong
and how to fix it, prints no traceback, creates no run folder and changes no existing file. Then a property test
(hypothesis): random recipes and data lines always get exit 0 or exit 2, never a traceback.

Rows run in-process through `qlora_kit.cli.main.main` (an exception escaping it is exactly a traceback); one row
also runs through the installed `qlora-kit` script in a real process."""

from __future__ import annotations

import contextlib
import copy
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FACTS, make_tiny_model, write_jsonl
from qlora_kit.quant import bnb as quant
from qlora_kit.cli.main import main

BASE = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "data": {"max_length": 64},
    "train": {"steps": 1, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "save_every": 0, "device": "cpu"},
}


# ---- fixtures: the good inputs, and broken models built from them ------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("models")

    def copy_of(name: str) -> Path:
        return Path(shutil.copytree(tiny_model, root / name))

    out = {"good": tiny_model, "missing": root / "no-such-model"}
    out["no-config"] = copy_of("no-config")
    (out["no-config"] / "config.json").unlink()
    out["encoder"] = root / "bert"  # a masked LM: transformers maps model_type bert to a causal head too
    BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(out["encoder"])
    for name, damage in [("truncated", lambda b: b[: len(b) // 2]), ("corrupt-header", lambda b: b"\xff" * 16 + b[16:]),
                         ("empty-weights", lambda b: b"")]:
        out[name] = copy_of(name)
        st_file = out[name] / "model.safetensors"
        st_file.write_bytes(damage(st_file.read_bytes()))
    out["pickle-only"] = copy_of("pickle-only")
    torch.save(load_file(str(out["pickle-only"] / "model.safetensors")), out["pickle-only"] / "pytorch_model.bin")
    (out["pickle-only"] / "model.safetensors").unlink()
    out["no-tokenizer"] = copy_of("no-tokenizer")
    for p in out["no-tokenizer"].glob("tokenizer*"):
        p.unlink()
    return out


def snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `roots` (or the file itself): its bytes and mtime. Folders count by their file lists."""
    files = {}
    for root in roots:
        for p in [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []:
            if p.is_file():
                files[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return files


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_refused(tmp_path: Path, recipe: dict | bytes, expect: list[str], *, data: Path, extra=(), also=()) -> str:
    """Write `recipe`, run `qlora-kit train` on it: exit 2, every `expect` in the message, no traceback, a short
    message, no run folder, and no file under tmp_path, the data or `also` changed."""
    path = tmp_path / "recipe.yaml"
    path.write_bytes(recipe if isinstance(recipe, bytes) else yaml.safe_dump(recipe, allow_unicode=True).encode())
    out = tmp_path / "run"
    before = snapshot(tmp_path, data, *also)
    code, err = run_cli(["train", str(path), "--out", str(out), "--no-progress", *extra])
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) <= 3, err
    for fragment in expect:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not out.exists()
    assert snapshot(tmp_path, data, *also) == before
    return err


def recipe_for(model: Path, data: Path, **changes) -> dict:
    """BASE over `model` and `data`; changes as section__key=value (value None removes the key)."""
    raw = copy.deepcopy(BASE)
    raw["model"] = {"path": str(model)}
    raw["data"]["path"] = str(data)
    for name, value in changes.items():
        section, key = name.split("__")
        raw.setdefault(section, {})[key] = value
    return raw


# ---- model rows ---------------------------------------------------------------------------------------------------

MODEL_ROWS = [
    ("missing", ["model folder not found", "Hugging Face model folder"]),
    ("no-config", ["has no config.json", "not a Hugging Face model folder"]),
    ("encoder", ["BertForMaskedLM", "not a causal language model"]),
    ("truncated", ["model.safetensors is truncated or corrupt", "re-download"]),
    ("corrupt-header", ["model.safetensors is truncated or corrupt", "re-download"]),
    ("empty-weights", ["model.safetensors is truncated or corrupt"]),
    ("pickle-only", ["only pickle checkpoints", "--allow-pickle", "safetensors"]),
    ("no-tokenizer", ["tokenizer cannot be loaded", "tokenizer.json"]),
]


@pytest.mark.parametrize("kind,expect", MODEL_ROWS, ids=[r[0] for r in MODEL_ROWS])
def test_bad_model(models, tiny_data, tmp_path, kind, expect):
    model = models[kind]
    assert_refused(tmp_path, recipe_for(model, tiny_data), expect, data=tiny_data, also=[model.parent])


# ---- recipe rows --------------------------------------------------------------------------------------------------

RECIPE_ROWS = [  # (id, changes to BASE, expected fragments)
    ("unknown-key", {"lora__rank": 8}, ["unknown key 'lora.rank'", "Did you mean 'r'?"]),
    ("unknown-key-typo", {"lora__alpah": 8}, ["unknown key 'lora.alpah'", "Did you mean 'alpha'?"]),
    ("unknown-section", {"trian__steps": 3}, ["unknown recipe section 'trian'", "Did you mean 'train'?"]),
    ("wrong-type-int", {"lora__r": "eight"}, ["lora.r: expected int, got str 'eight'"]),
    ("wrong-type-float", {"train__lr": [1]}, ["train.lr: expected", "got list"]),
    ("wrong-type-choice", {"quant__type": "nf5"}, ["quant.type: 'nf5' is not allowed", "'nf4'"]),
    ("r-zero", {"lora__r": 0}, ["lora.r = 0 is out of range", "> 0"]),
    ("r-negative", {"lora__r": -4}, ["lora.r = -4 is out of range"]),
    ("alpha-zero", {"lora__alpha": 0}, ["lora.alpha = 0.0 is out of range", "> 0"]),
    ("dropout-negative", {"lora__dropout": -0.1}, ["lora.dropout = -0.1 is out of range", "[0, 1)"]),
    ("dropout-one", {"lora__dropout": 1.0}, ["lora.dropout = 1.0 is out of range", "[0, 1)"]),
    ("lr-zero", {"train__lr": 0}, ["train.lr = 0.0 is out of range", "> 0"]),
    ("lr-negative", {"train__lr": -1e-4}, ["train.lr = -0.0001 is out of range"]),
    ("lr-nan", {"train__lr": float("nan")}, ["train.lr: expected a finite number"]),
    ("batch-zero", {"train__batch_size": 0}, ["train.batch_size = 0 is out of range", "> 0"]),
    ("max-length-zero", {"data__max_length": 0}, ["data.max_length = 0 is out of range", "> 0"]),
    ("seed-too-big", {"train__seed": 2**70}, ["train.seed", "out of range"]),
    ("targets-match-nothing", {"lora__targets": ["query", "value"]},
     ["matched no Linear module", "q_proj", "v_proj", "down_proj", "lora.targets"]),
    ("targets-bad-regex", {"lora__targets": "(q|v_proj"}, ["not a valid regular expression", "all-linear"]),
    ("rank-beyond-layers", {"lora__r": 100_000}, ["lora.r=100000 is larger than any targeted layer", "<= 64"]),
    ("paged-optimizer-on-cpu", {"train__optimizer": "paged_adamw8bit"}, ["needs a CUDA GPU", "adamw8bit"]),
    ("cuda-without-gpu", {"train__device": "cuda"}, ["no CUDA GPU is visible", "train.device=auto"]),
    ("surrogate-in-system-prompt", {"data__system_prompt": "\ud800"}, ["data.system_prompt", "lone surrogate"]),
]


@pytest.mark.parametrize("changes,expect", [r[1:] for r in RECIPE_ROWS], ids=[r[0] for r in RECIPE_ROWS])
def test_bad_recipe(tiny_model, tiny_data, tmp_path, changes, expect):
    if torch.cuda.is_available() and ("paged" in str(changes) or "cuda" in str(changes)):
        pytest.skip("a CUDA GPU is present: these settings are valid here")
    assert_refused(tmp_path, recipe_for(tiny_model, tiny_data, **changes), expect, data=tiny_data)


@pytest.mark.parametrize("content,expect", [
    (b"model: [unclosed\n", ["is not valid YAML (line 2", "expected ',' or ']'"]),
    (b"model:\n  path: a\n   bad: indent\n", ["is not valid YAML (line 3"]),
    (b"- a list\n- not a mapping\n", ["must be a YAML mapping with sections model, quant, lora"]),
    (b"\xff\xfe binary", ["is not valid YAML"]),
    (b"model: !!python/object/apply:os.getcwd []\n", ["is not valid YAML", "python/object/apply"]),
], ids=["unclosed", "indentation", "list", "not-utf8", "python-tag"])
def test_recipe_that_is_not_yaml(tiny_data, tmp_path, content, expect):
    assert_refused(tmp_path, content, expect, data=tiny_data)


def test_recipe_file_missing_and_bad_override(tiny_model, tiny_data, tmp_path):
    code, err = run_cli(["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")])
    assert code == 2 and "recipe not found" in err and "Traceback" not in err
    assert_refused(tmp_path, recipe_for(tiny_model, tiny_data), ["unknown key 'train.stpes'", "Did you mean 'steps'?"],
                   data=tiny_data, extra=["--set", "train.stpes=3"])
    assert_refused(tmp_path, recipe_for(tiny_model, tiny_data), ["expected section.key=value"], data=tiny_data,
                   extra=["--set", "steps"])


def test_8bit_optimizer_where_bitsandbytes_cannot_run(tiny_model, tiny_data, tmp_path, monkeypatch):
    def no_kernel(*a, **k):  # what bitsandbytes raises on a device it has no kernel for
        raise NotImplementedError("no kernel registered for optimizer_update_8bit_blockwise on this device")

    monkeypatch.setattr(quant.bnbF, "optimizer_update_8bit_blockwise", no_kernel)
    assert_refused(tmp_path, recipe_for(tiny_model, tiny_data, train__optimizer="adamw8bit"),
                   ["train.optimizer=adamw8bit", "bitsandbytes cannot run it", "no kernel", "train.optimizer=adamw"],
                   data=tiny_data)


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])  # int8 quantizes in plain torch (quant.int8_quantize): no kernel
def test_quantization_where_bitsandbytes_cannot_run(tiny_model, tiny_data, tmp_path, monkeypatch, qtype):
    def no_kernel(*a, **k):
        raise RuntimeError("bitsandbytes: no native library for this platform")

    monkeypatch.setattr(quant.bnbF, "quantize_4bit", no_kernel)
    monkeypatch.setattr(quant.bnbF, "quantize_blockwise", no_kernel)  # the CPU path's double quantization
    assert_refused(tmp_path, recipe_for(tiny_model, tiny_data, quant__type=qtype),
                   [f"quant.type={qtype}", "bitsandbytes cannot quantize", "quant.type=none"], data=tiny_data)
    monkeypatch.undo()  # quant.type none never calls bitsandbytes, so the same machine can still train
    code, err = run_cli(["train", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"), "--no-progress",
                         "--set", "quant.type=none"])
    assert code == 0, err


# ---- data rows ----------------------------------------------------------------------------------------------------

DATA_ROWS = [  # (id, file name, bytes, data.format, data.max_length, expected fragments; {path} is the data file)
    ("missing", None, None, "alpaca", 64, ["data file not found: {path}", "data.path"]),
    ("empty", "d.jsonl", b"", "alpaca", 64, ["{path} holds no records", '"instruction"']),
    ("blank-lines-only", "d.jsonl", b"\n  \n", "alpaca", 64, ["{path} holds no records"]),
    ("malformed-line", "d.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
     "alpaca", 64, ["{path}:2: invalid JSON", "column"]),
    ("malformed-json-list", "d.json", b'[{"text": "a"},\n {"text": ]', "text", 64, ["{path}:2: invalid JSON"]),
    ("missing-field", "d.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "only"}\n', "alpaca", 64,
     ["{path}:2: missing field 'output'", "found: instruction", '"output": "..."']),
    ("wrong-format", "d.jsonl", json.dumps(FACTS[0]).encode(), "chat", 64,
     ["{path}:1: missing field 'messages'", "data.format"]),
    ("not-an-object", "d.jsonl", b"[1, 2]\n", "text", 64, ["{path}:1: expected a JSON object, got list"]),
    ("no-assistant-turn", "d.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "chat", 64,
     ["no assistant message"]),
    ("not-utf8", "d.jsonl", b'{"text": "caf\xe9"}\n', "text", 64, ["is not UTF-8", "re-save it as UTF-8"]),
    ("lone-surrogate", "d.jsonl", b'{"instruction": "a\\ud800", "output": "b"}\n', "alpaca", 64,
     ["{path}:1: a string holds a lone surrogate"]),
    ("all-too-long", "d.jsonl", "".join(json.dumps(r) + "\n" for r in FACTS).encode(), "alpaca", 8,
     ["no example has a trainable token left", "data.max_length=8", "--set data.max_length="]),
]


@pytest.mark.parametrize("name,content,fmt,max_length,expect", [r[1:] for r in DATA_ROWS],
                         ids=[r[0] for r in DATA_ROWS])
def test_bad_data(tiny_model, tmp_path, name, content, fmt, max_length, expect):
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / (name or "absent.jsonl")
    if content is not None:
        path.write_bytes(content)
    raw = recipe_for(tiny_model, path, data__format=fmt, data__max_length=max_length)
    assert_refused(tmp_path, raw, [e.format(path=path) for e in expect], data=folder)


def _parquet(folder: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), folder / "d.parquet")
    return folder / "d.parquet"


def _saved_with_empty_train(folder: Path) -> Path:
    import datasets

    full = datasets.Dataset.from_list(FACTS)
    datasets.DatasetDict({"train": full.filter(lambda r: False), "test": full}).save_to_disk(str(folder / "s"))
    return folder / "s"


QA = [{"q": r["instruction"], "a": r["output"]} for r in FACTS]
SOURCE_ROWS = [  # (id, make(folder) -> data.path, data changes, expected fragments)
    ("parquet-without-mapped-columns", lambda f: _parquet(f, QA), {},
     ["d.parquet has no column 'instruction', 'output'", "columns: q, a", "data.columns={instruction: YOUR_COLUMN"]),
    ("columns-names-missing-column", lambda f: _parquet(f, QA), {"columns": {"instruction": "q", "output": "answer"}},
     ["data.columns maps 'output' to column 'answer'", "columns: q, a", "Fix data.columns"]),
    ("columns-names-unknown-field", lambda f: write_jsonl(f / "d.jsonl", FACTS), {"columns": {"question": "q"}},
     ["data.columns names 'question'", "fields are instruction, output, input"]),
    ("sharegpt-unknown-from", lambda f: write_jsonl(f / "d.jsonl", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}]), {"format": "sharegpt"},
     ["d.jsonl:1: conversations[1] has 'from': 'bot'", "human, user, gpt, assistant, system"]),
    ("empty-split", _saved_with_empty_train, {}, ["split 'train' is empty", "data.split"]),
    ("empty-csv", lambda f: (f / "d.csv").write_text("instruction,output\n") and f / "d.csv", {},
     ["split 'train' is empty"]),
    ("missing-split", _saved_with_empty_train, {"split": "validation"}, ["has no split 'validation'", "train, test"]),
    ("hub-name-offline", lambda f: "someone/some-dataset", {}, ["'someone/some-dataset'", "offline", "HF_HUB_OFFLINE"]),
    ("unknown-suffix", lambda f: (f / "d.txt").write_text("x") and f / "d.txt", {}, ["unknown suffix '.txt'"]),
    ("columns-not-a-mapping", lambda f: write_jsonl(f / "d.jsonl", FACTS), {"columns": ["q"]},
     ["data.columns: expected a mapping"]),
]


@pytest.mark.parametrize("make,changes,expect", [r[1:] for r in SOURCE_ROWS], ids=[r[0] for r in SOURCE_ROWS])
def test_bad_data_source(tiny_model, tmp_path, monkeypatch, make, changes, expect):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "data"
    folder.mkdir()
    path = make(folder)
    raw = recipe_for(tiny_model, path, **{f"data__{k}": v for k, v in changes.items()})
    assert_refused(tmp_path, raw, expect, data=folder)


# ---- export rows (tests/test_export.py checks the messages; here: no existing file changes) ----------------------


@pytest.fixture(scope="module")
def trained_run(tiny_model, tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-rows")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(tiny_model, tiny_data, train__steps=2)))
    code, err = run_cli(["train", str(recipe), "--out", str(folder / "run"), "--no-progress"])
    assert code == 0, err
    other = {"fewer-layers": make_tiny_model(folder / "one-layer", layers=1),
             "other-shapes": make_tiny_model(folder / "narrow", hidden=32, intermediate=96)}
    return folder / "run", other


EXPORT_ROWS = [
    ("missing-modules", ["--base", "fewer-layers"], ["does not fit the base", "layers.1"]),
    ("shape-mismatch", ["--base", "other-shapes"], ["does not fit the base"]),
    ("out-exists", [], ["already exists", "--force"]),
    ("disk-full", [], ["not enough disk space"]),
]


@pytest.mark.parametrize("case,extra,expect", EXPORT_ROWS, ids=[r[0] for r in EXPORT_ROWS])
def test_bad_export_changes_nothing(trained_run, tiny_model, tmp_path, monkeypatch, case, extra, expect):
    from qlora_kit.export import files as export_files

    run_dir, bases = trained_run
    extra = [str(bases[a]) if a in bases else a for a in extra]
    out = tmp_path / "out"
    if case == "out-exists":
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"someone's earlier export")
    if case == "disk-full":
        monkeypatch.setattr(export_files, "free_bytes", lambda path: 4096)  # a nearly full disk, simulated
    watched = [run_dir, tiny_model, tmp_path, *bases.values()]
    before = snapshot(*watched)
    code, err = run_cli(["export", str(run_dir), "--format", "merged", "--out", str(out), "--no-progress", *extra])
    assert code == 2 and "Traceback" not in err, err
    assert all(e in err for e in expect), err
    assert snapshot(*watched) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if case == "out-exists" else [])  # no partial output


# ---- a real process: the installed script, its exit code and stderr ---------------------------------------------


def test_real_process_exit_2_and_no_traceback(tiny_model, tiny_data, tmp_path):
    script = Path(sys.executable).parent / "qlora-kit"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(tiny_model, tiny_data, lora__targets=["nope"])))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(script) if script.exists() else sys.executable, *([] if script.exists() else
                          ["-m", "qlora_kit.cli.main"]), "train", str(recipe), "--out", str(tmp_path / "run"),
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "matched no Linear module" in res.stderr
    assert not (tmp_path / "run").exists()


# ---- property test: random recipes and data lines ----------------------------------------------------------------

FIELDS = {  # every recipe key, with the values that make sense for it (drawn sometimes; junk the rest of the time)
    "model": {"path": [], "dtype": ["auto", "bf16", "fp16", "fp32"], "allow_pickle": [True, False],
              "trust_remote_code": [True, False]},
    "quant": {"type": ["nf4", "fp4", "int8", "none"], "double_quant": [True, False], "blocksize": [32, 64, 128],
              "compute_dtype": ["bf16", "fp32"]},
    "lora": {"r": [1, 2, 8], "alpha": [1, 16.0], "dropout": [0.0, 0.1],
             "targets": ["all-linear", ["q_proj"], ".*_proj"], "init": ["kaiming", "gaussian"],
             "rslora": [True, False]},
    "data": {"path": [], "format": ["alpaca", "chat", "text"], "max_length": [4, 16, 64], "train_on_prompt": [True],
             "packing": [True, False], "val_fraction": [0.0, 0.3], "system_prompt": [None, "Be brief."]},
    "train": {"steps": [1], "batch_size": [1, 3], "grad_accum": [1, 2], "lr": [1e-3, 1e-1], "warmup_steps": [0, 3],
              "schedule": ["cosine", "linear", "constant"], "optimizer": ["adamw", "adamw8bit", "paged_adamw"],
              "weight_decay": [0.0, 0.1], "max_grad_norm": [0.0, 1.0], "seed": [0, 7], "gradient_checkpointing":
              [True, False], "log_every": [1], "eval_every": [0, 1], "save_every": [0, 1], "keep_checkpoints": [1],
              "on_nonfinite": ["stop", "skip"], "device": ["auto", "cpu", "cuda"], "num_threads": [0, 1, 3]},
    "output": {"dir": ["runs/x"]},
}
# Memory-sized keys get small junk ints: a batch of 2**31 rows is a resource problem, not a parsing one.
SMALL_INTS = {"batch_size", "grad_accum", "num_threads", "steps"}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([2**31, 2**64, -2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["1e-3", "nan", "inf", "\ud800", "all-linear", "(", "yes", "~", "0x10", "q_proj"]),
)
junk = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


@st.composite
def recipes(draw) -> dict:
    """BASE with 0-4 keys changed: mostly valid keys and values (so that many examples train), some junk."""
    raw = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(sorted(FIELDS)))
        key = draw(st.sampled_from(sorted(FIELDS[section])) if draw(st.integers(0, 9))
                   else st.text(min_size=1, max_size=6))
        good = FIELDS[section].get(key) or []
        value = draw(st.sampled_from(good) if good and draw(st.integers(0, 3)) else junk)
        if key in SMALL_INTS and isinstance(value, int) and not isinstance(value, bool):
            value = max(-3, min(value, 4))
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][key] = value
    if draw(st.integers(0, 20)) == 0:  # a whole section replaced by junk
        raw[draw(st.sampled_from(sorted(FIELDS)))] = draw(junk)
    return raw


def _record(draw) -> str:
    """One data line: usually a valid alpaca record (the default format), else anything a file might hold."""
    text = st.text(min_size=1, max_size=20)
    kind = draw(st.sampled_from(["alpaca"] * 12 + ["chat", "text", "json", "junk", "huge", "deep", "blank"]))
    if kind == "alpaca":
        return json.dumps({"instruction": draw(text), "input": draw(text), "output": draw(text)})
    if kind == "chat":
        role = draw(st.sampled_from(["user", "assistant", "system", "bot"]))
        return json.dumps({"messages": [{"role": "user", "content": draw(text)},
                                        {"role": role, "content": draw(text)}]})
    if kind == "text":
        return json.dumps({"text": draw(text)})
    if kind == "json":
        values = st.recursive(scalars.filter(lambda v: not isinstance(v, float) or v == v), lambda c: st.lists(c) |
                              st.dictionaries(st.sampled_from(["text", "instruction", "output", "messages", "x"]), c),
                              max_leaves=6)
        return json.dumps(draw(values))
    if kind == "huge":
        return draw(st.sampled_from(['{"text": 1e999}', '{"text": "a", "n": ' + "9" * 5000 + "}",
                                     '{"instruction": "\\ud800", "output": "x"}', '{"text": "\\u0000"}']))
    if kind == "deep":
        return "[" * 5000 + "]" * 5000
    if kind == "blank":
        return ""
    return draw(st.text(max_size=30).filter(lambda s: "\n" not in s))


@st.composite
def data_files(draw) -> str:
    return "\n".join(_record(draw) for _ in range(draw(st.integers(1, 6)))) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=recipes(), data_text=data_files())
def test_random_recipes_and_data_get_exit_0_or_2(tiny_model, tmp_path_factory, raw, data_text):
    folder = tmp_path_factory.mktemp("prop")
    data = folder / "data.jsonl"
    data.write_text(data_text, encoding="utf-8", errors="surrogatepass")
    for section, path in (("model", tiny_model), ("data", data)):  # never the defaults: the real demo model
        if raw.get(section) is None:
            raw[section] = {}
        if isinstance(raw[section], dict) and not isinstance(raw[section].get("path"), str):
            raw[section]["path"] = str(path)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    before, threads = snapshot(recipe, data), torch.get_num_threads()
    try:
        code, err = run_cli(["train", str(recipe), "--out", str(folder / "run"), "--no-progress",
                             "--set", "train.steps=1"])
    finally:
        torch.set_num_threads(threads)  # a recipe may set train.num_threads; keep the test process as it was
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and not (folder / "run").exists(), err
    assert snapshot(recipe, data) == before
