"""Preference training on two processes (gloo, CPU): DDP through torchrun and FSDP through accelerate launch compute
the same steps as one process with twice the pairs per batch (fp32 tiny Llama, answers of unequal lengths)."""

from __future__ import annotations

import pytest
import torch

from conftest import write_jsonl
from test_distributed import _write, accelerate_launch, adapter, finish, torchrun
from qlora_kit.config import recipe_from_dict
from qlora_kit.run.folder import read_metrics
from qlora_kit.train import loop as train

STEPS = 3
STATS = ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def _raw(model, data_path, batch_size=2) -> dict:
    return {"model": {"path": str(model), "dtype": "fp32"}, "quant": {"compute_dtype": "fp32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"path": str(data_path), "format": "preference", "max_length": 64},
            "train": {"objective": "dpo", "beta": 0.5, "steps": STEPS, "batch_size": batch_size, "lr": 1e-2,
                      "warmup_steps": 0, "schedule": "constant", "save_every": 0, "device": "cpu",
                      "num_threads": 1, "seed": 5}}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pref-dist")
    records = [{"prompt": f"Question {i}: " + "tell me " * (i % 5), "chosen": " ".join(["yes"] * (2 + (i * 7) % 39)),
                "rejected": "no " * (1 + i % 3)} for i in range(16)]
    data_path = write_jsonl(root / "pairs.jsonl", records)
    recipe = _write(root / "r", _raw(tiny_model, data_path))
    procs = {}
    for name, launcher, extra in (("ddp", torchrun, ()), ("fsdp", accelerate_launch, ("--set", "train.parallel=fsdp"))):
        cwd = root / f"cwd-{name}"
        cwd.mkdir()
        procs[name] = (launcher(recipe, cwd / "run", *extra, cwd=cwd), cwd / "run")
    threads = torch.get_num_threads()
    try:
        train.run(recipe_from_dict(_raw(tiny_model, data_path, batch_size=4)), root / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    return procs, root / "single"


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_twice_the_pairs(runs, name):
    procs, single = runs
    proc, run = procs[name]
    _, err = finish(proc)
    assert f"2 processes ({name})" in err
    a, b = adapter(run), adapter(single)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ours, ref = read_metrics(run), read_metrics(single)
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))
    for m, r in zip(ours, ref):  # every rank's pairs count in the step's mean and in the rewards
        for k in STATS:
            assert m[k] == pytest.approx(r[k], rel=1e-4, abs=1e-6), (k, m, r)
