"""Preference training on tiny models: per-answer log-probs against transformers' forward, the reference at step 1,
accumulation, every objective through the loop (metrics), the precomputed reference, eval on a preference file."""

import json
import math

import pytest
import torch

from conftest import tiny_recipe, write_jsonl
from qlora_kit.adapters import lora
from qlora_kit.data import pipeline as data, preference as data_preference
from qlora_kit.train import loop as train, reference

PAIRS = [{"prompt": f"Question {i}: hello world?" + " and" * (i % 7),
          "chosen": "Paris is in France." + " yes" * (i % 5), "rejected": "hello" + " no" * (3 * i % 11)}
         for i in range(12)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", PAIRS)


def _recipe(model, path, objective="dpo", dtype="auto", **train_keys):
    return tiny_recipe(model, path, data={"format": "preference", "max_length": 64}, model={"dtype": dtype},
                       train={"objective": objective, **train_keys}, quant={"compute_dtype": "fp32"})


def _randomize_b(p, std=0.1):
    torch.manual_seed(3)
    for mod in p.model.modules():
        if isinstance(mod, lora.LoRALinear):
            torch.nn.init.normal_(mod.lora_B.weight, std=std)
    p.optimizer.sync_from_params()


def test_sequence_logps_equal_transformers_forward(tiny_model, pairs):
    """Summed log-probs of the label tokens, rows of different lengths right-padded, against log_softmax of
    transformers' own logits in float64: with gradients (training path: checkpointed chunks, deferred lean norm)
    and without (the reference path)."""
    p = train.prepare(_recipe(tiny_model, pairs, loss_chunk=7))
    _randomize_b(p)
    units = p.dataset.train[:4]
    batch = data_preference.collate(units, data.pad_token_id(p.tokenizer))
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 3  # varying lengths, so padding is exercised
    loss_fn = p.loss_fn
    ours, counts = loss_fn.seq_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    p.model.eval()
    with torch.no_grad():
        ours_ng, _ = loss_fn.seq_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
        logits = p.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1)
    y = batch["labels"][:, 1:]
    mask = y != -100
    ref = (lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours_ng.double(), ref, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == mask.sum(1).tolist()


def test_dpo_at_step_one_is_ln2_with_zero_rewards(tiny_model, pairs):
    """B = 0: the policy is the reference exactly, so every log-ratio is 0, the loss ln 2 and every reward 0; LoRA
    dropout on and bf16 compute: the policy's path (checkpointed, lean norms) equals the no-grad reference's."""
    recipe = tiny_recipe(tiny_model, pairs, data={"format": "preference", "max_length": 64},
                         train={"objective": "dpo"}, lora={"dropout": 0.1})
    p = train.prepare(recipe)
    batch = data_preference.collate(p.dataset.train[:3], data.pad_token_id(p.tokenizer))
    res = train.train_step(p, [batch], lr=1e-3, max_grad_norm=1.0)
    assert res.loss == float(torch.tensor(math.log(2), dtype=torch.float32))
    assert res.stats["rewards_chosen"] == 0.0 and res.stats["rewards_rejected"] == 0.0
    assert res.stats["reward_margin"] == 0.0 and res.stats["reward_accuracy"] == 0.0
    assert res.grad_norm > 0  # B receives a gradient at B = 0


def _optimizer_grads(p, micro_batches):
    seen = []
    p.optimizer.inner.step = lambda *a, **k: seen.append([g.clone() for g in p.optimizer.grads])
    res = train.train_step(p, micro_batches, lr=1e-3, max_grad_norm=0.0)
    return seen[0], res


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_grad_accum_equals_one_batch_of_twice_the_pairs(tiny_model, pairs, objective):
    """fp32 residual stream: in bf16 the batches' different padded widths alone move gradients by ~3e-4."""
    p = train.prepare(_recipe(tiny_model, pairs, objective, "fp32", beta=0.5))
    _randomize_b(p)
    pad = data.pad_token_id(p.tokenizer)
    u = p.dataset.train[:4]
    a, b, whole = (data_preference.collate(x, pad) for x in (u[:2], u[2:], u))
    (ga, ra), (gb, rb) = _optimizer_grads(p, [a, b]), _optimizer_grads(p, [whole])
    for x, y in zip(ga, gb):  # ipo's gradients are large (a square of summed log-ratios): tolerance by the scale
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))
    assert ra.loss == pytest.approx(rb.loss, rel=1e-5)
    for k in rb.stats:
        assert ra.stats[k] == pytest.approx(rb.stats[k], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "kto", "simpo"])
def test_every_objective_trains_through_the_loop_with_its_metrics(tiny_model, pairs, tmp_path, objective):
    recipe = tiny_recipe(tiny_model, pairs, data={"format": "preference", "max_length": 64, "val_fraction": 0.25},
                         train={"objective": objective, "steps": 3, "lr": 1e-2})
    summary = train.run(recipe, tmp_path / "run", progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {"loss", "rewards_chosen", "rewards_rejected", "reward_margin"} | (
        set() if objective == "kto" else {"reward_accuracy"})
    assert keys <= set(metrics[0]) and all(math.isfinite(m["loss"]) for m in metrics)
    assert "val_loss" in metrics[-1] and "val_reward_margin" in metrics[-1]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["steps"] == 3


def test_precomputed_reference_equals_the_in_step_reference_and_is_reused(tiny_model, pairs, tmp_path, monkeypatch):
    p = train.prepare(_recipe(tiny_model, pairs, precompute_reference=True))
    _randomize_b(p)
    batch = data_preference.collate(p.dataset.train[:4], data.pad_token_id(p.tokenizer))
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["desirable"])
    in_step, _ = p.loss_fn(*args)
    ref = reference.attach(p, tmp_path)
    assert (tmp_path / reference.FILE).is_file() and ref.abs().min() > 0
    stored, _ = p.loss_fn(*args, example=batch["example"])
    assert float(stored.detach()) == pytest.approx(float(in_step.detach()), rel=1e-5)
    monkeypatch.setattr(reference, "precompute", lambda *a, **k: pytest.fail("computed again"))
    torch.testing.assert_close(reference.attach(p, tmp_path), ref)  # a resumed run reads the stored values


def test_eval_reports_the_objective_loss_and_reward_accuracy(tiny_model, pairs, tmp_path, capsys):
    from qlora_kit.cli.main import main

    recipe = tiny_recipe(tiny_model, pairs, data={"format": "preference", "max_length": 64},
                         train={"objective": "dpo", "steps": 2})
    train.run(recipe, tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run"), "--data", str(pairs), "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"loss", "reward_accuracy", "reward_margin"} <= set(res) and res["objective"] == "dpo"
    assert 0 <= res["reward_accuracy"] <= 1 and math.isfinite(res["loss"])
    assert main(["eval", str(tiny_model), "--data", str(pairs), "--format", "preference", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)  # no adapter: the policy is its own reference
    assert res["loss"] == pytest.approx(math.log(2), abs=1e-6) and res["reward_margin"] == 0.0
    assert main(["eval", str(tiny_model), "--data", str(pairs), "--format", "preference", "--all-tokens"]) == 2
    assert "--all-tokens does not apply" in capsys.readouterr().err


def test_resume_with_a_precomputed_reference_is_bitwise_identical_and_reads_it(tiny_model, pairs, tmp_path,
                                                                               monkeypatch):
    """Resume continues a dpo run exactly (data position over pairs, RNG, adapter, optimizer) and reads the run's
    stored reference log-probs instead of computing them again."""
    import shutil

    from qlora_kit.adapters.peft_format import load_adapter

    recipe = tiny_recipe(tiny_model, pairs, data={"format": "preference", "max_length": 64},
                         train={"objective": "dpo", "steps": 4, "save_every": 2, "keep_checkpoints": 5,
                                "precompute_reference": True}, lora={"dropout": 0.1})
    train.run(recipe, tmp_path / "a", progress=False)
    train.run(recipe, tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "b" / "adapter")
    monkeypatch.setattr(reference, "precompute", lambda *a, **k: pytest.fail("computed again on resume"))
    train.run(recipe, tmp_path / "b", resume=True, progress=False)
    a, b = load_adapter(tmp_path / "a" / "adapter"), load_adapter(tmp_path / "b" / "adapter")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]


def test_reference_is_the_quantized_base_alone_with_dora_and_ia3_trained(tiny_model, pairs):
    """With every method's tensors moved away from their identity (LoRA/DoRA B, DoRA magnitudes, IA3 vectors), the
    reference log-probs equal those of the same quantized base loaded on its own, without any adapter, through
    transformers' forward; the policy's differ."""
    from qlora_kit.config import recipe_from_dict
    from qlora_kit.model.load import load_base

    recipe = _recipe(tiny_model, pairs, "dpo", "fp32")
    raw = recipe.to_dict() | {"ia3": {}}
    raw["lora"]["dora"] = True
    p = train.prepare(recipe_from_dict(raw))
    torch.manual_seed(0)
    with torch.no_grad():
        for t in p.model.parameters():
            if t.requires_grad:
                t.add_(torch.randn_like(t) * 0.2)  # B, A, magnitudes, IA3 vectors: all away from identity
    batch = data_preference.collate(p.dataset.train[:3], data.pad_token_id(p.tokenizer))
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    ours = p.loss_fn.reference_logps(*args)
    base, _, _ = load_base(recipe.model, recipe.quant, "cpu")
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    y = batch["labels"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours.double(), (lp * (y != -100)).sum(1), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        policy, _ = p.loss_fn.seq_logps(*args)
    assert (policy - ours).abs().min() > 1e-2
