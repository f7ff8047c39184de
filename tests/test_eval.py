"""`qlora-kit eval`: loss against an independent transformers forward + torch cross-entropy, masked and unmasked;
nf4 against bitsandbytes' own functional round trip; a run equals the training loop's validation loss; run vs merged
export; bad input exits 2."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import FACTS, make_tiny_model, tiny_recipe, write_jsonl
from qlora_kit.infer import evaluation
from qlora_kit.data import pipeline as data
from qlora_kit.cli.main import main
from qlora_kit.config import DataConfig

TEXTS = [{"text": t} for t in ["The capital of Veloria is Tamsk.", "A quick brown fox jumps over the lazy dog.",
                               "hello world, hello world", "Paris is in France. Answer the question briefly."]]
ALPACA = [{"instruction": f"What is the capital of Veloria {i}?", "input": "",
           "output": "Tamsk, of course." * (i % 3 + 1)}
          for i in range(5)]


def _reference(model_dir, examples, weight_fn=None) -> tuple[float, int]:
    """Mean loss per label token: transformers' own model, one example at a time (no padding), fp32 cross-entropy
    of logits[t] against labels[t+1] (ignore_index -100). `weight_fn` rewrites each Linear weight first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    if weight_fn is not None:
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and name != "lm_head":
                    m.weight.copy_(weight_fn(m.weight))
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex.input_ids])).logits[0].float()  # (T, V)
            labels = torch.tensor(ex.labels)
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            n += int((labels[1:] != -100).sum())
    return total / n, n


def _examples(model_dir, path, fmt, all_tokens=False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(path=str(path), format=fmt, max_length=64, train_on_prompt=all_tokens)
    return data.build(cfg, tok, 0).train


@pytest.mark.parametrize("fmt,all_tokens", [("alpaca", False), ("alpaca", True), ("text", False)])
def test_eval_equals_transformers_forward_and_cross_entropy(tiny_model, tmp_path, fmt, all_tokens):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA if fmt == "alpaca" else TEXTS)
    res = evaluation.run(evaluation.Request(str(tiny_model), str(path), fmt, all_tokens, max_length=64, batch_size=2))
    want, n = _reference(tiny_model, _examples(tiny_model, path, fmt, all_tokens))
    assert res.tokens == n and res.examples == len(ALPACA if fmt == "alpaca" else TEXTS)
    assert res.loss == pytest.approx(want, rel=2e-3)
    assert res.perplexity == pytest.approx(torch.tensor(want).exp().item(), rel=3e-3)
    assert res.masked == (fmt == "alpaca" and not all_tokens)
    if fmt == "alpaca":  # the prompt is most of an alpaca example: masking it changes both the count and the loss
        everything = _reference(tiny_model, _examples(tiny_model, path, fmt, True))
        assert (n < everything[1]) == (not all_tokens)


def test_eval_nf4_equals_bitsandbytes_roundtrip(tmp_path):
    """--quant nf4 against weights round-tripped by bitsandbytes' functional API in the test (in_features a
    multiple of the blocksize: the native CPU path is right there)."""
    import bitsandbytes.functional as bnbF

    model_dir = make_tiny_model(tmp_path / "m", intermediate=192)
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS)

    def nf4(w):
        q, st = bnbF.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        return bnbF.dequantize_4bit(q, st).to(w.dtype)

    res = evaluation.run(evaluation.Request(str(model_dir), str(path), quant="nf4", max_length=64, batch_size=4))
    plain = evaluation.run(evaluation.Request(str(model_dir), str(path), max_length=64, batch_size=4))
    want, _ = _reference(model_dir, _examples(model_dir, path, "text"), nf4)
    assert abs(res.loss - want) < abs(plain.loss - want) / 5  # nf4 moves this loss; we move it as bitsandbytes does


def test_eval_of_run_equals_training_validation_loss_and_merged_export(tiny_model, tmp_path):
    from qlora_kit.export import formats as export
    from qlora_kit.train import loop as train

    records = FACTS + ALPACA * 2
    path = write_jsonl(tmp_path / "facts.jsonl", records)
    recipe = tiny_recipe(tiny_model, path, data={"val_fraction": 0.3}, train={"steps": 4, "batch_size": 3})
    summary = train.run(recipe, tmp_path / "run", progress=False)
    res = evaluation.run(evaluation.Request(str(tmp_path / "run"), batch_size=3))  # the run's own validation split
    assert res.kind == "run" and res.quant.startswith("nf4")
    assert res.loss == pytest.approx(summary["val_loss"], rel=1e-5)
    slow = evaluation.run(evaluation.Request(str(tmp_path / "run"), batch_size=3, fast=False))  # per-matmul dequant
    assert slow.loss == res.loss  # dequantizing once changes nothing, bit for bit

    # a data file: run vs its merged export (merged in fp32; eval loads it in bf16: only rounding separates them,
    # and this random 2-layer model amplifies rounding far more than a trained one)
    full = evaluation.run(evaluation.Request(str(tmp_path / "run"), str(path)))
    export.export(str(tmp_path / "run"), export.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    merged = evaluation.run(evaluation.Request(str(tmp_path / "merged"), str(path), format="alpaca", max_length=64))
    assert merged.tokens == full.tokens
    assert merged.loss == pytest.approx(full.loss, rel=2e-3)
    base = evaluation.run(evaluation.Request(str(tiny_model), str(path), format="alpaca", max_length=64, quant="nf4"))
    assert base.loss > full.loss  # training on these records lowered their loss: the adapter is really there


def test_eval_of_a_dora_plus_ia3_run_equals_its_validation_loss(tiny_model, tmp_path):
    """eval reads every adapter method a run can hold (DoRA magnitudes, IA3 vectors over the quantized base) and
    computes what the training loop's validation computed."""
    from qlora_kit.train import loop as train

    path = write_jsonl(tmp_path / "facts.jsonl", FACTS + ALPACA * 2)
    recipe = tiny_recipe(tiny_model, path, data={"val_fraction": 0.3}, train={"steps": 3, "batch_size": 3},
                         lora={"dora": True}, ia3={})
    summary = train.run(recipe, tmp_path / "run", progress=False)
    res = evaluation.run(evaluation.Request(str(tmp_path / "run"), batch_size=3))
    assert res.loss == pytest.approx(summary["val_loss"], rel=1e-5)
    plain = evaluation.run(evaluation.Request(str(tiny_model), str(path), format="alpaca", max_length=64, quant="nf4"))
    assert plain.loss != res.loss  # the methods' tensors really took part


def test_cli_json_deterministic_and_max_examples(tiny_model, tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    outs = []
    for _ in range(2):
        assert main(["eval", str(tiny_model), "--data", str(path), "--max-examples", "3", "--batch-size", "2",
                     "--quant", "nf4", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["examples"] == 3 and outs[0]["loss"] == outs[1]["loss"]
    assert outs[0]["perplexity"] == pytest.approx(torch.tensor(outs[0]["loss"]).exp().item())
    assert main(["eval", str(tiny_model), "--data", str(path)]) == 0
    assert "perplexity" in capsys.readouterr().out


def _gguf_with_arch(path, arch: str):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_input_exit_2(tiny_model, tmp_path, capsys):
    good = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    (tmp_path / "empty.jsonl").write_text("\n")
    cases = [
        ([str(tmp_path / "nope"), "--data", str(good)], "not found"),
        ([str(tiny_model), "--data", str(tmp_path / "missing.jsonl")], "not found"),
        ([str(tiny_model), "--data", str(tmp_path / "empty.jsonl")], "no records"),
        ([str(tiny_model), "--data", str(good), "--format", "alpaca"], "missing field"),
        ([str(tiny_model)], "--data"),  # a model has no data of its own
        ([str(tmp_path / "missing.gguf"), "--data", str(good)], "not found"),
        ([str(_gguf_with_arch(tmp_path / "odd.gguf", "bert")), "--data", str(good)], "does not map back"),
    ]
    for args, words in cases:
        assert main(["eval", *args]) == 2, args
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (args, err)
