"""KTO's reference point z0 over a whole optimizer step: the mismatched pairs belong to the units (not the batch), z0
is the mean over every one of the step, so k micro-batches of unequal sizes and lengths compute the same step as one
big batch. (TRL 1.16 writes its KTO loss inline in KTOTrainer._compute_loss, with z0 the mean of per-rank batch
means: nothing callable to compare with; test_preference_losses checks the loss against the paper in float64.)"""

import pytest
import torch

from conftest import write_jsonl
from qlora_kit.data import pipeline as data, preference as data_preference
from qlora_kit.train import loop as train, objectives, preference
from test_preference_train import PAIRS, _optimizer_grads, _randomize_b, _recipe

# unpaired records (one answer each, some prompts shared) next to pairs: answers of very different lengths
UNPAIRED = [{"prompt": f"Say {i % 4}", "completion": "ok " * (1 + (5 * i) % 17), "label": i % 3 != 0}
            for i in range(8)]


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", PAIRS[:5] + UNPAIRED)


def test_partners_are_the_nearest_earlier_unit_of_another_record():
    assert data_preference.kl_partners([0, 0, 1, 2, 2]) == [4, 4, 1, 2, 2]
    assert data_preference.kl_partners([3, 3]) == [None, None]  # one record: no mismatched pair exists


def test_grad_accum_over_unequal_micro_batches_equals_one_batch(tiny_model, kto_data):
    p = train.prepare(_recipe(tiny_model, kto_data, "kto", "fp32", beta=0.5, kto_undesirable_weight=1.5))
    _randomize_b(p, std=0.3)
    pad = data.pad_token_id(p.tokenizer)
    u = p.dataset.train[:7]
    parts = [u[:1], u[1:3], u[3:]]
    micro = [data_preference.collate(x, pad) for x in parts]
    whole = data_preference.collate(u, pad)
    lengths = whole["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 4
    loss_fn = p.loss_fn
    with torch.no_grad():  # what a per-micro-batch z0 would be: different in each batch, and not clamped to 0
        own = [float(objectives.kto_z0(loss_fn.kl_sums(b["input_ids"], b["attention_mask"], b["labels"])))
               for b in micro]
    assert max(own) - min(own) > 1e-2, own
    (ga, ra), (gb, rb) = _optimizer_grads(p, micro), _optimizer_grads(p, [whole])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))
    assert ra.loss == pytest.approx(rb.loss, rel=1e-5)
    for k in rb.stats:
        assert ra.stats[k] == pytest.approx(rb.stats[k], rel=1e-5, abs=1e-6)
    # and the step's z0 is the mean log-ratio over the pairs of all three batches together
    z0 = float(preference.step_z0(loss_fn, micro, torch.device("cpu")))
    with torch.no_grad():
        kl = whole["input_ids"][1::2], whole["attention_mask"][1::2], whole["labels"][1::2]
        ratios = loss_fn.seq_logps(*kl)[0].double() - loss_fn.reference_logps(*kl).double()
    assert z0 > 0.1 and z0 == pytest.approx(float(ratios.mean()), rel=1e-5)


def test_eval_z0_is_over_every_answer_not_per_batch(tiny_model, kto_data):
    p = train.prepare(_recipe(tiny_model, kto_data, "kto", "fp32", beta=0.5))
    _randomize_b(p, std=0.3)
    pad = data.pad_token_id(p.tokenizer)
    units = data.Units(p.dataset.train.tok, p.dataset.train.groups[:8])
    small, big = (preference.evaluate(p.loss_fn, units, b, pad, torch.device("cpu")) for b in (3, len(units)))
    for k in big:
        assert small[k] == pytest.approx(big[k], rel=1e-5, abs=1e-6), k
