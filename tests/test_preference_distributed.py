"""Preference training on two processes (gloo, CPU): DDP through torchrun and FSDP through accelerate launch compute
the same steps as one process with twice the pairs per batch (fp32 tiny Llama, answers of unequal lengths); for KTO
with accumulation too, its z0 the mean over every mismatched pair of the step on both ranks."""

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


RECORDS = [{"prompt": f"Question {i}: " + "tell me " * (i % 5), "chosen": " ".join(["yes"] * (2 + (i * 7) % 39)),
            "rejected": "no " * (1 + i % 3)} for i in range(16)]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pref-dist")
    data_path = write_jsonl(root / "pairs.jsonl", RECORDS)
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


def test_kto_two_ranks_with_accumulation_equal_one_process(tiny_model, tmp_path):
    """z0 per micro-batch or per rank would differ here: every step's z0 is over the 8 mismatched pairs of its 2
    micro-batches on 2 ranks, in the two-process run as in the one-process run."""
    # mostly desirable answers of one kind: the policy raises them, so mismatched pairs' log-ratios (z0) go above 0
    unpaired = [{"prompt": f"Question {i}: " + "tell me " * (i % 5), "completion": " ".join(["yes"] * (2 + i % 9)),
                 "label": i % 4 != 0} for i in range(16)]
    data_path = write_jsonl(tmp_path / "kto.jsonl", unpaired)
    raw = _raw(tiny_model, data_path)
    raw["train"].update(objective="kto", grad_accum=2)
    recipe = _write(tmp_path / "r", raw)
    (tmp_path / "cwd").mkdir()
    proc = torchrun(recipe, tmp_path / "cwd" / "run", cwd=tmp_path / "cwd")
    single = _raw(tiny_model, data_path, batch_size=4)
    single["train"].update(objective="kto", grad_accum=2)
    threads = torch.get_num_threads()
    try:
        train.run(recipe_from_dict(single), tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    _, err = finish(proc)
    assert "2 processes (ddp)" in err
    a, b = adapter(tmp_path / "cwd" / "run"), adapter(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for m, r in zip(read_metrics(tmp_path / "cwd" / "run"), read_metrics(tmp_path / "single"), strict=True):
        for k in ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "reward_margin"):
            assert m[k] == pytest.approx(r[k], rel=1e-4, abs=1e-6), (k, m, r)
