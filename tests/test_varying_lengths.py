"""Every training option on batches of varying length, as real data sets have: each step's batch is padded to a
different length, so anything that keeps a shape from one step into the next (host buffer pools, tiles, saved
masks, packed rows) is exercised. Options that are exact must give the plain run's losses; the others must train
(finite, falling loss) without error."""

from __future__ import annotations

import math

import pytest

from conftest import make_tokenizer, tiny_recipe, write_jsonl
from qlora_kit.config import DataConfig
from qlora_kit.data import tokens
from qlora_kit.run.folder import read_metrics
from qlora_kit.train import loop as train

WORDS = "the capital of Veloria is Tamsk and Paris is in France a quick brown fox jumps".split()
RECORDS = [{"instruction": f"Say {i} words about Veloria.", "output": " ".join(WORDS[j % len(WORDS)]
                                                                               for j in range(1 + (i * 7) % 24))}
           for i in range(12)]
STEPS = 6

# option -> (recipe sections, exact: the plain run's losses to rtol)
OPTIONS = {
    "offload_activations": ({"train": {"offload_activations": True}}, 0.0),
    "no_checkpointing": ({"train": {"gradient_checkpointing": False}}, 0.0),
    "mlp_chunk": ({"train": {"mlp_chunk": 8}}, 2e-2),  # bf16 sums in another order
    "grad_accum": ({"train": {"grad_accum": 2, "batch_size": 2}}, None),
    "packing": ({"data": {"packing": True}}, None),
    "dora": ({"lora": {"dora": True}}, None),
    "ia3": ({"ia3": {}}, None),
    "fp32_compute": ({"quant": {"compute_dtype": "fp32"}}, None),
    "loss_chunk": ({"train": {"loss_chunk": 7}}, 1e-3),
}


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("varied") / "varied.jsonl", RECORDS)
    tok = tokens.tokenize_all(DataConfig(path=str(path), format="alpaca", max_length=200), make_tokenizer())
    lengths = (tok.offsets[1:] - tok.offsets[:-1]).tolist()
    assert max(lengths) - min(lengths) >= 30, lengths  # batches of 4 then pad to different lengths every step
    return path


def losses(tiny_model, data_path, tmp_path, name, **sections) -> list[float]:
    base = {"train": {"steps": STEPS, "batch_size": 3, "save_every": 0, "num_threads": 1, "lr": 5e-3},
            "data": {"max_length": 200}, "lora": {"dropout": 0.0}}
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    r = tiny_recipe(tiny_model, data_path, **base)
    train.run(r, tmp_path / name, progress=False)
    return [m["loss"] for m in read_metrics(tmp_path / name)]


@pytest.fixture(scope="module")
def plain(tiny_model, varied, tmp_path_factory):
    return losses(tiny_model, varied, tmp_path_factory.mktemp("plain"), "run")


@pytest.mark.parametrize("option", list(OPTIONS))
def test_training_option_on_batches_of_varying_length(tiny_model, varied, plain, tmp_path, option):
    sections, rtol = OPTIONS[option]
    got = losses(tiny_model, varied, tmp_path, option, **sections)
    assert len(got) == STEPS and all(math.isfinite(v) for v in got), got
    if rtol is not None:
        assert got == pytest.approx(plain, rel=rtol, abs=0), (option, got, plain)
    else:
        assert got[-1] < got[0], (option, got)
