"""Packing without cross-talk: position ids restart per document, attention stays inside each
document, and a packed batch computes the same per-token losses as the same examples unpacked (fp32)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model, make_tokenizer, write_jsonl
from qlora_kit.train import loop as train
from qlora_kit.data import pipeline as data
from qlora_kit.config import DataConfig
from qlora_kit.train.loss import CausalLMLoss
from qlora_kit.data.packing import document_ids, pack

IGNORE = -100
RECORDS = [{"instruction": f"What is the capital of Veloria {'and more ' * (i % 5)}{i}?",
            "output": "The capital of Veloria is Tamsk. " * (1 + i % 3)} for i in range(10)]


@pytest.fixture(scope="module")
def model32(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(tmp_path_factory.mktemp("fp32") / "m", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", RECORDS)
    tok = make_tokenizer()
    plain = data.build(DataConfig(path=str(path), max_length=120), tok, seed=0)
    packed = data.build(DataConfig(path=str(path), max_length=120, packing=True), tok, seed=0)
    return tok, list(plain.train), list(packed.train)


def _documents(row: data.Example) -> list[tuple[int, int]]:
    """[(start, end)] of each document in a packed row, from its position ids."""
    docs = document_ids(row.position_ids)
    return [(docs.index(d), len(docs) - docs[::-1].index(d)) for d in sorted(set(docs))]


def test_packed_rows_restart_positions_and_hold_whole_examples(built):
    tok, plain, packed = built
    assert len(packed) < len(plain) and all(len(r.input_ids) <= 120 for r in packed)
    unpacked = sorted(tuple(e.input_ids) for e in plain)
    found = []
    for row in packed:
        assert len(row.position_ids) == len(row.input_ids) == len(row.labels)
        for s, e in _documents(row):
            assert row.position_ids[s:e] == list(range(e - s))  # restarts at 0, counts up by one
            assert row.labels[s] == IGNORE  # never "predict document 2 from document 1"
            found.append(tuple(row.input_ids[s:e]))
    assert sorted(found) == unpacked  # every example once, never split
    batch = data.collate(packed[:2], data.pad_token_id(tok))
    pos, n = batch["position_ids"], batch["attention_mask"].sum(1)
    for r in range(2):  # the padding of a row restarts too, as its own "document"
        assert pos[r, n[r]:].tolist() == list(range(pos.shape[1] - int(n[r])))
    assert "position_ids" not in data.collate(plain[:2], data.pad_token_id(tok))


def _token_losses(model, batch) -> torch.Tensor:
    """Per-position loss (B, T-1) fp32 from transformers' own forward (0 where no label)."""
    packed = "position_ids" in batch
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False,
                   attention_mask=None if packed else batch["attention_mask"]).logits.float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")


@torch.no_grad()
def test_packed_per_token_losses_equal_unpacked(built, model32):
    tok, plain, packed = built
    pad = data.pad_token_id(tok)
    alone = {}  # example ids -> its per-token losses computed alone
    for ex in plain:
        alone[tuple(ex.input_ids)] = _token_losses(model32, data.collate([ex], pad))[0]
    batch = data.collate(packed, pad)
    together = _token_losses(model32, batch)
    compared = 0
    for r, row in enumerate(packed):
        for s, e in _documents(row):
            ref = alone[tuple(row.input_ids[s:e])]  # (len-1,): position t predicts t+1 inside the document
            got = together[r, s : e - 1]
            keep = torch.tensor(row.labels[s + 1 : e]) != IGNORE
            torch.testing.assert_close(got[keep], ref[keep], rtol=1e-5, atol=1e-5)
            compared += int(keep.sum())
    assert compared == sum(train.label_tokens(data.collate([e], pad)) for e in plain)

    # Our loss module on the packed batch: the token-weighted mean of the examples' losses.
    loss_fn = CausalLMLoss(model32, chunk=16)
    got, n = loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"], position_ids=batch["position_ids"])
    parts = [loss_fn(**{k: v for k, v in data.collate([e], pad).items()}) for e in plain]
    want = sum(float(m) * k for m, k in parts) / sum(k for _, k in parts)
    assert n == sum(k for _, k in parts) and float(got) == pytest.approx(want, rel=1e-5)
    # The old packing (one causal row, no restart) conditions each document on the ones before: it differs.
    crosstalk, _ = loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert abs(float(crosstalk) - want) > 1e-3


def test_no_token_attends_across_a_document_boundary(built, model32):
    """The loss of the second document of a row has zero gradient wrt every embedding of the first."""
    tok, _, packed = built
    row = next(r for r in packed if len(_documents(r)) >= 2)
    (s0, e0), (s1, e1) = _documents(row)[:2]
    batch = data.collate([row], data.pad_token_id(tok))
    labels = torch.full_like(batch["labels"], IGNORE)
    labels[0, s1 + 1 : e1] = batch["input_ids"][0, s1 + 1 : e1]  # only document 2 takes loss
    seen = {}

    def capture(module, args, out):
        seen["emb"] = out.detach().requires_grad_()
        return seen["emb"]

    handle = model32.get_input_embeddings().register_forward_hook(capture)
    try:
        loss, _ = CausalLMLoss(model32)(batch["input_ids"], batch["attention_mask"], labels,
                                   position_ids=batch["position_ids"])
        loss.backward()
    finally:
        handle.remove()
        model32.zero_grad()
    grad = seen["emb"].grad[0].abs().sum(-1)  # (T,)
    assert torch.all(grad[s0:e0] == 0) and torch.all(grad[s1:e1 - 1] > 0)


def test_pack_is_seeded_and_fills_rows():
    exs = [data.Example([i + 1] * n, [i + 1] * n) for i, n in enumerate([5, 3, 7, 2, 4, 6, 1])]
    a, b = pack(exs, 8, random.Random(3)), pack(exs, 8, random.Random(3))
    assert a == b and all(len(r.input_ids) <= 8 for r in a) and sum(len(r.input_ids) for r in a) == 28
    assert pack(exs, 8, random.Random(4)) != a


def test_training_with_packing_runs(tiny_model, tmp_path):
    from conftest import tiny_recipe

    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    recipe = tiny_recipe(tiny_model, path, data={"packing": True, "max_length": 120}, train={"steps": 2})
    summary = train.run(recipe, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]
