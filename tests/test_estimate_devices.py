"""Per-device estimate of a multi-process run: `qlora-kit estimate --gpus N --parallel ddp|fsdp`."""

from __future__ import annotations

import json

import pytest

from qlora_kit.estimate import devices as md
from qlora_kit.estimate import analytic as me
from qlora_kit.cli.main import main

LLAMA70 = me.BUILTIN_CONFIGS["llama-3.1-70b"]


def test_llama_70b_builtin_has_the_published_shape():
    s = me.count_params(LLAMA70)
    assert 70.0e9 < s.total < 71.0e9  # Meta: 70.6B parameters
    assert (s.hidden, s.layers, s.intermediate, s.kv_heads, s.vocab) == (8192, 80, 28672, 8, 128256)


def test_fsdp_shards_the_frozen_base_and_ddp_replicates_it():
    cfg = me.EstimateConfig(batch=1, seq=2048)
    one = me.estimate(LLAMA70, cfg)
    frozen = sum(one.components[k] for k in md.FROZEN)
    # the frozen bytes from the parameter count alone: 4.127 bits per linear weight (nf4 + double quant constants)
    # plus 2 bytes per unquantized parameter
    s = one.shapes
    assert frozen == pytest.approx(s.linear_params * 4.127 / 8 + 2 * sum(s.other.values()), rel=1e-3)
    fsdp = md.per_device(LLAMA70, cfg, 2, "fsdp")
    assert fsdp.per_device["frozen_shard"] == -(-frozen // 2)
    layer_q = (one.components["quantized_weights"] + one.components["quant_constants"]) / s.layers
    assert fsdp.per_device["gathered_layers"] == pytest.approx(2 * layer_q, rel=1e-3)
    assert fsdp.per_device["root_gathered"] == 2 * s.other["norm"]  # untied: lm_head is the loss head's unit
    # lm_head is gathered around the loss only: the loss-head phase holds it whole, the decoder's backward does not
    assert fsdp.peak_phase == "decoder_backward" and fsdp.per_device["head_gathered"] == 0
    lean = md.per_device(LLAMA70, me.EstimateConfig(batch=1, seq=2048, offload_activations=True, mlp_chunk=512), 2,
                         "fsdp")
    assert lean.peak_phase == "loss_head" and lean.per_device["head_gathered"] == 2 * s.other["lm_head"]
    assert lean.per_device["gathered_layers"] == pytest.approx(layer_q, rel=1e-3)  # only the prefetched one
    ddp = md.per_device(LLAMA70, cfg, 2, "ddp")
    assert ddp.total >= one.total and fsdp.total < 0.7 * one.total
    four = md.per_device(LLAMA70, cfg, 4, "fsdp")
    assert four.per_device["frozen_shard"] == -(-frozen // 4) and four.total < fsdp.total


def test_llama_70b_on_two_24gib_gpus_says_whether_it_fits_and_what_makes_it_fit(capsys):
    argv = ["estimate", "--model", "llama-3.1-70b", "--gpus", "2", "--parallel", "fsdp", "--seq", "2048",
            "--batch", "1", "--gpu-mem", "24GiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "frozen base, this GPU's shard (1/N)" in out and "total per GPU" in out and "fits in 24GiB per GPU:" in out
    assert main([*argv, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpus"] == 2 and d["fits"] == (d["total"] <= 24 * 2**30)
    if not d["fits"]:  # every suggestion must itself fit, recomputed here
        assert d["what_fits"]
        for fix in d["what_fits"]:
            assert fix["total"] <= 24 * 2**30
    assert [r["gpu_gib"] for r in d["max_seq"]] == list(me.GPU_SIZES_GIB)


def test_max_seq_per_device_grows_with_more_gpus_under_fsdp():
    cfg = me.EstimateConfig(batch=1)
    two = {r["gpu_gib"]: r["max_seq"] for r in md.max_seq_table(LLAMA70, cfg, 2, "fsdp")}
    four = {r["gpu_gib"]: r["max_seq"] for r in md.max_seq_table(LLAMA70, cfg, 4, "fsdp")}
    assert two[80] and four[80] and four[80] > two[80]
    assert two[8] is None  # 70B in 4 bits is ~18 GiB per GPU on two: nothing fits in 8 GiB


def test_the_70b_recipe_states_its_own_estimate():
    """recipes/llama3-70b-2x24gb.yaml says what `estimate` predicts for it: the comment must match the code."""
    import re

    from qlora_kit.config import load_recipe

    path = "recipes/llama3-70b-2x24gb.yaml"
    r = load_recipe(path)
    stated = float(re.search(r"predicts ([0-9.]+) GiB per GPU", open(path).read()).group(1))
    cfg = me.EstimateConfig(rank=r.lora.r, batch=r.train.batch_size, seq=r.data.max_length,
                            optimizer=r.train.optimizer, lora_dropout=r.lora.dropout,
                            offload_activations=r.train.offload_activations, mlp_chunk=r.train.mlp_chunk)
    d = md.per_device(LLAMA70, cfg, 2, r.train.parallel)
    assert r.train.parallel == "fsdp" and round(d.total / 2**30, 2) == stated
    assert d.total <= 24 * 2**30  # the recipe's name is its promise
