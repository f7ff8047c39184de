"""The estimate counts the preference objective (estimate/objective.py): 2 rows per pair with gradients, the no-grad
reference pass (none for orpo/simpo or with a precomputed reference), kto's answers with gradients and its mismatched
pairs without; from a recipe and from the command line; and against a measured step on a tiny model."""

import dataclasses
import json

import pytest

from conftest import tiny_recipe, write_jsonl
from qlora_kit.cli.main import main
from qlora_kit.errors import ConfigError
from qlora_kit.estimate import analytic as me
from qlora_kit.estimate.recipe import from_recipe
from qlora_kit.measure.breakdown import MeasureConfig, measure

SMOL = me.BUILTIN_CONFIGS["smollm2-135m"]


def _e(**kw) -> me.Estimate:
    return me.estimate(SMOL, me.EstimateConfig(batch=2, seq=512, device="cpu", **kw))


def test_paired_objectives_run_two_rows_per_pair():
    sft2 = me.estimate(SMOL, me.EstimateConfig(batch=4, seq=512, device="cpu"))
    for objective in ("dpo", "ipo", "orpo", "simpo"):
        e = _e(objective=objective)
        assert e.activation_terms == sft2.activation_terms and e.logits_terms == sft2.logits_terms
        for phase in ("loss_head", "decoder_backward", "optimizer_step"):
            assert e.phases[phase] == sft2.phases[phase], (objective, phase)
    assert _e().phases["loss_head"] < sft2.phases["loss_head"]  # sft at batch 2: half the rows


def test_the_reference_pass_is_counted_where_it_runs():
    assert "reference_pass" not in _e().phases
    for objective in ("orpo", "simpo"):  # reference-free
        assert "reference_pass" not in _e(objective=objective).phases and not _e(objective=objective).objective_terms
    dpo, pre = _e(objective="dpo"), _e(objective="dpo", precompute_reference=True)
    assert "reference_pass" in dpo.phases and "reference_pass" not in pre.phases
    assert dpo.phases["reference_pass"] > sum(dpo.components[k] for k in ("quantized_weights", "adapters"))
    # kto: its answers with gradients (batch rows, as sft), its no-grad passes over batch rows
    kto, sft = _e(objective="kto"), _e()
    assert kto.activation_terms == sft.activation_terms and kto.phases["loss_head"] == sft.phases["loss_head"]
    assert 0 < kto.objective_terms["reference_decoder"] < dpo.objective_terms["reference_decoder"]
    with pytest.raises(ConfigError, match="precompute_reference"):
        _e(objective="orpo", precompute_reference=True)


def test_from_recipe_and_the_command_line_carry_the_objective(tiny_model, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    r = tiny_recipe(tiny_model, pairs, data={"format": "preference"},
                    train={"objective": "dpo", "precompute_reference": True})
    cfg = from_recipe(r)
    assert cfg.objective == "dpo" and cfg.precompute_reference
    assert main(["estimate", "--model", "smollm2-135m", "--objective", "dpo", "--seq", "512", "--batch", "2",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "objective dpo: 4 rows with gradients" in out and "reference pass" in out
    assert main(["estimate", "--model", "smollm2-135m", "--objective", "ipo", "--precompute-reference", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["objective"] == "ipo" and "reference_pass" not in d["phases"]
    assert main(["estimate", "--model", "smollm2-135m", "--objective", "simpo", "--precompute-reference"]) == 2


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("est-obj") / "m", intermediate=192)
    base = MeasureConfig(model=str(model), seq=64, batch=2, rank=4, steps=2, threads=1)
    return {o: measure(dataclasses.replace(base, objective=o)) for o in ("sft", "dpo", "kto")}


def test_measured_step_of_each_objective_against_the_estimate(measured):
    """What the objective adds is what a real step adds: the estimate's dpo - sft difference (2 rows per pair)
    against the measured one, each peak, and the reference pass (a phase of its own in the measured timeline)."""
    sft, dpo, kto = measured["sft"], measured["dpo"], measured["kto"]
    for m in (sft, dpo, kto):
        assert abs(m["error"]) < 0.03, (m["config"]["objective"], m["error"])
    grown, estimated = dpo["peak_bytes"] - sft["peak_bytes"], dpo["estimate_total"] - sft["estimate_total"]
    assert grown > 0.3 * sft["peak_bytes"]
    assert estimated == pytest.approx(grown, rel=0.10)
    for m in (dpo, kto):
        assert m["estimate_phases"]["reference_pass"] == pytest.approx(m["phases"]["reference_pass"], rel=0.05)
    assert "reference_pass" not in sft["phases"]
