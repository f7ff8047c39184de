"""`qlora-kit estimate RECIPE.yaml`: the recipe's own sections decide the estimate (one mapping, estimate/recipe.py,
shared with the measured breakdown); --set and the flags override them; bad keys exit 2 naming the nearest one."""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import yaml

from qlora_kit.cli.main import main
from qlora_kit.config import load_recipe, recipe_from_dict
from qlora_kit.estimate import analytic as me
from qlora_kit.estimate.recipe import from_recipe

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def _json(capsys, *args) -> dict:
    rc = main(["estimate", *args, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def _same(a: dict, b: dict) -> None:
    for key in ("components", "total", "phases", "adapter_params", "max_seq", "config"):
        assert a[key] == b[key], key


def test_demo_recipe_equals_the_same_flags(capsys):
    raw = yaml.safe_load(DEMO.read_text())
    assert raw["data"]["max_length"] == 128 and raw["model"]["path"] == "smollm2-135m"  # what the flags restate
    from_file = _json(capsys, str(DEMO))
    by_flags = _json(capsys, "--model", "smollm2-135m", "--quant", "nf4", "--double-quant", "--blocksize", "64",
                     "--compute-dtype", "bf16", "--rank", "16", "--lora-dropout", "0.05", "--targets", "all-linear",
                     "--seq", "128", "--batch", "4", "--optimizer", "adamw", "--device", "cuda")
    _same(from_file, by_flags)
    assert from_file["model"] == "smollm2-135m" and from_file["config"]["seq"] == 128


def test_recipe_sections_reach_the_estimate(tmp_path, capsys):
    """Every section the estimate reads changes its answer the way the same flag does."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": "llama-3.1-8b"}, "quant": {"type": "int8"}, "lora": {"r": 8, "targets": ["q_proj", "v_proj"],
                                                                           "dropout": 0.0, "dora": True},
        "ia3": {}, "data": {"max_length": 512}, "train": {"batch_size": 2, "optimizer": "paged_adamw8bit",
                                                        "mlp_chunk": 256, "offload_activations": True,
                                                        "device": "cpu", "loss_chunk": 128}}))
    got = _json(capsys, str(recipe))
    cfg = from_recipe(load_recipe(recipe))
    want = me.estimate(me.BUILTIN_CONFIGS["llama-3.1-8b"], cfg)
    assert got["total"] == want.total and got["components"] == want.components
    assert got["config"]["device"] == "cpu" and got["config"]["dora"] and got["config"]["mlp_chunk"] == 256
    flags = _json(capsys, "--model", "llama-3.1-8b", "--quant", "int8", "--rank", "8", "--targets", "q_proj,v_proj",
                  "--lora-dropout", "0", "--dora", "--ia3", "--seq", "512", "--batch", "2", "--optimizer",
                  "paged_adamw8bit", "--mlp-chunk", "256", "--offload-activations", "--device", "cpu",
                  "--loss-chunk", "128")
    _same(got, flags)


def test_set_and_flags_override_the_recipe(capsys):
    base = _json(capsys, str(DEMO))
    by_set = _json(capsys, str(DEMO), "--set", "lora.r=8", "--set", "data.max_length=512")
    by_flag = _json(capsys, str(DEMO), "--rank", "8", "--seq", "512")
    assert by_set["config"]["rank"] == 8 and by_set["config"]["seq"] == 512
    assert by_set["adapter_params"] == base["adapter_params"] // 2
    _same(by_set, by_flag)
    # a flag wins over the recipe and over --set
    both = _json(capsys, str(DEMO), "--set", "lora.r=8", "--rank", "32")
    assert both["config"]["rank"] == 32
    # --set without a recipe starts from the recipe defaults
    assert _json(capsys, "--set", "model.path=mistral-7b", "--set", "lora.r=4")["config"]["rank"] == 4


@pytest.mark.parametrize("args,msg", [
    (["--set", "lora.rank=8"], "unknown key 'lora.rank'. Did you mean 'r'?"),
    (["--set", "train.batchsize=8"], "Did you mean 'batch_size'?"),
    (["--set", "lorra.r=8"], "Did you mean 'lora'?"),
])
def test_bad_recipe_key_exit_2(capsys, tmp_path, args, msg):
    rc = main(["estimate", str(DEMO), *args])
    _, err = capsys.readouterr()
    assert rc == 2 and msg in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: smollm2-135m}\nquant: {typ: nf4}\n")
    rc = main(["estimate", str(bad)])
    _, err = capsys.readouterr()
    assert rc == 2 and "unknown key 'quant.typ'. Did you mean 'type'?" in err


def test_no_recipe_no_model_exit_2(capsys):
    rc = main(["estimate"])
    _, err = capsys.readouterr()
    assert rc == 2 and "needs a recipe" in err


def test_measure_uses_the_same_mapping():
    """measure/'s estimate_config is the recipe mapping (with this process' dropout mode): no second language."""
    from qlora_kit.measure.breakdown import estimate_config

    r = recipe_from_dict({"lora": {"r": 4, "dora": True}, "ia3": {"outputs": ["k_proj"], "inputs": []},
                          "train": {"mlp_chunk": 64}})
    assert estimate_config(r, "cpu") == from_recipe(r, "cpu")
    assert from_recipe(r).device == "cuda" and from_recipe(r, "cpu").ia3_outputs == ("k_proj",)
