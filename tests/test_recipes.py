"""Every shipped recipe parses and validates; the demo recipe's data builds; config errors are precise."""

from pathlib import Path

import pytest

from qlora_kit.config import load_recipe, recipe_from_dict
from qlora_kit.errors import ConfigError

RECIPES = sorted(Path("recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=str)
def test_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.lora.r > 0 and recipe.train.steps > 0


def test_demo_recipe_is_the_documented_one():
    r = load_recipe("recipes/demo.yaml")
    assert (r.model.path, r.quant.type, r.quant.double_quant, r.train.gradient_checkpointing) == \
        ("smollm2-135m", "nf4", True, True)


@pytest.mark.parametrize("raw,message", [
    ({"lora": {"rank": 8}}, "Did you mean 'r'"),
    ({"trian": {}}, "Did you mean 'train'"),
    ({"lora": {"r": 0}}, "lora.r = 0 is out of range"),
    ({"lora": {"dropout": 1.0}}, "in [0, 1)"),
    ({"train": {"lr": "fast"}}, "train.lr: expected float"),
    ({"quant": {"type": "nf5"}}, "choose one of"),
    ({"quant": {"blocksize": 100}}, "one of [32, 64"),
    ({"lora": {"targets": 3}}, "lora.targets"),
])
def test_config_errors_name_field_and_fix(raw, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        recipe_from_dict(raw)


def test_overrides_parse_yaml_values():
    r = recipe_from_dict({}, ["lora.targets=[q_proj, v_proj]", "train.lr=1e-3", "train.steps=7",
                              "quant.double_quant=false"])
    assert r.lora.targets == ["q_proj", "v_proj"] and r.train.lr == 1e-3 and r.train.steps == 7
    assert r.quant.double_quant is False
    with pytest.raises(ConfigError, match="section.key=value"):
        recipe_from_dict({}, ["steps=3"])
