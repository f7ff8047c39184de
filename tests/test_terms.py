"""The shared vocabulary (qlora_kit/terms.py): one size rule, one scaling rule, one set of quant names."""

import math
import typing

import pytest

from qlora_kit import config, terms
from qlora_kit.errors import ConfigError


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 << 30), ("24 GB", 24 * 10**9), ("24g", 24 << 30), ("24G", 24 << 30), ("1.5GiB", 3 << 29),
    ("512MiB", 512 << 20), ("500MB", 500 * 10**6), (" 200 kb ", 200_000), ("2k", 2048), ("1TB", 10**12),
    ("3b", 3), ("1tib", 1 << 40), (4096, 4096),  # a Python int is bytes already
])
def test_parse_size_table(text, expected):
    assert terms.parse_size(text) == expected


@pytest.mark.parametrize("text,msg", [
    ("24", "has no unit"), ("0.5", "has no unit"),  # one rule for a bare number everywhere: refused, name the unit
    ("", "is not a size"), ("GiB", "is not a size"), ("24 potatoes", "is not a size"), ("2XB", "is not a size"),
    ("-3GiB", "is not a size"), ("0MB", "is not a size"), (0, "not a positive"), (-1, "not a positive"),
])
def test_parse_size_refuses(text, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        terms.parse_size(text, "--gpu-mem")
    assert "--gpu-mem" in str(e.value)


def test_human_bytes():
    assert [terms.human_bytes(n) for n in (12, 3 << 10, 512 << 20, 2 << 30)] == [
        "12 B", "3.00 KiB", "512.00 MiB", "2.00 GiB"]


def test_lora_scale_against_the_papers():
    assert terms.lora_scale(32, 16, False) == 2.0  # Hu et al. 2021: alpha / r
    assert terms.lora_scale(32, 16, True) == 8.0  # rsLoRA: alpha / sqrt(r)
    assert terms.lora_scale(8, 3, True) == pytest.approx(8 / math.sqrt(3), rel=1e-15)


def test_one_quant_vocabulary():
    # the recipe's choices are the terms' own (not a copy that can drift)
    quant_field = {f.name: f for f in config.dataclasses.fields(config.QuantConfig)}["type"]
    assert typing.get_args(typing.get_type_hints(config.QuantConfig)["type"]) == terms.QUANT_TYPES
    assert quant_field.default in terms.QUANT_TYPES
    assert terms.QUANT_TYPES == ("nf4", "fp4", "int8", "none")
