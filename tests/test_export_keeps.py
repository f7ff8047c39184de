"""Exports that keep the fine-tune, and say so: --format quantized-adapter loads in transformers + peft as the
training-time model (the 4-bit codes bitsandbytes itself computes); --format quantized measures what re-quantizing
kept and refuses when almost nothing; every export's loss check against transformers' own forward and a fp32
cross-entropy written here; generate and eval run a model folder as stored. Tiny random Llamas, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import FACTS, make_tiny_model, tiny_recipe, write_jsonl
from test_export import linear_shapes, random_adapter, rel, training_time_model
from qlora_kit.cli.main import main
from qlora_kit.export import files as export_files, formats as ex
from qlora_kit.export.hf_folder import Survival
from qlora_kit.quant import bnb as quant

# answers of varying length (3 to 30 words): the validation split and the logit checks see ragged batches
RECORDS = FACTS + [{"instruction": f"List colour group {i}.", "input": "",
                    "output": ", ".join(["red", "green", "blue", "amber", "teal"][: i % 5 + 1] * (i % 4 + 1))}
                   for i in range(12)]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """(run, data file): QLoRA (nf4, fp32 compute) on a tiny Llama whose in_features are multiples of 64 (what
    bitsandbytes' CPU kernels need), with a validation split of 6 records."""
    from qlora_kit.train import loop as train

    root = tmp_path_factory.mktemp("aligned")
    base = make_tiny_model(root / "base", intermediate=128)
    path = write_jsonl(root / "data.jsonl", RECORDS)
    recipe = tiny_recipe(base, path, quant={"compute_dtype": "fp32"}, data={"val_fraction": 0.25},
                         train={"steps": 8, "batch_size": 3})
    train.run(recipe, root / "run", progress=False)
    return root / "run", path


def cli(*args) -> int:
    return main(["export", *map(str, args), "--no-progress"])


def ragged_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 12 and 5 tokens, right-padded, with their attention mask."""
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3, 8, 120, 64, 2], [9, 33, 71, 140, 6, 0, 0, 0, 0, 0, 0, 0]])
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


@torch.no_grad()
def masked_logits(model) -> torch.Tensor:
    ids, mask = ragged_ids()
    return model(input_ids=ids, attention_mask=mask).logits.float()[mask.bool()]


def no_cpu_bf16_kernel(model):
    """bitsandbytes' Linear4bit on an AVX512-BF16 CPU multiplies through a bf16 kernel at inference, an
    approximation of dequant(Q) @ x; switched off, it computes the stored model."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def test_quantized_adapter_is_the_training_time_model(aligned, tmp_path):
    """transformers loads the base 4-bit (bitsandbytes Linear4bit, the codes bitsandbytes' own quantize_4bit
    computes from the bf16 weight), peft loads the adapter beside it: the logits are the training-time model's."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run, _ = aligned
    out = tmp_path / "qa"
    res = ex.export(run, ex.Options("quantized-adapter", out, progress=False))
    assert res.survival is None and (out / "adapter" / "adapter_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["bnb_4bit_compute_dtype"] == "float32"
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = f.get_tensor(name)
    with safe_open(str(_base_of(run) / "model.safetensors"), "pt") as f:
        W = f.get_tensor(name)
    q, _ = bnbF.quantize_4bit(W.to(torch.bfloat16), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(stored, q)  # the very codes training multiplied by

    model = AutoModelForCausalLM.from_pretrained(out)  # as stored: bf16 embeddings/norms, 4-bit Linears computing fp32
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    model = no_cpu_bf16_kernel(model)
    model = PeftModel.from_pretrained(model, out / "adapter").eval()
    ours = training_time_model(run, as_trained=True)
    assert torch.equal(masked_logits(model), masked_logits(ours))  # bit for bit
    with model.disable_adapter():  # and the adapter matters: the base alone is far off
        assert rel(masked_logits(model), masked_logits(ours)) > 1e-3


def _base_of(run: Path) -> Path:
    from qlora_kit.config import load_recipe

    return Path(load_recipe(run / "recipe.yaml").model.path)


def test_quantized_adapter_refusals_and_full_disk(aligned, tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    run, _ = aligned
    plain = random_adapter(tmp_path / "ia", tiny_model, ["model.layers.0.self_attn.q_proj"], linear_shapes(tiny_model))
    cases = [([run, "--dtype", "fp16"], "drop --dtype"), ([plain, "--quant", "int8"], "int8 base")]
    for extra, message in cases:
        assert cli(extra[0], "--format", "quantized-adapter", "--out", tmp_path / "o", *extra[1:]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    monkeypatch.setattr(export_files, "free_bytes", lambda path: 1000)
    assert cli(run, "--format", "quantized-adapter", "--out", tmp_path / "o") == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_survival_measures_what_requantizing_kept():
    """A change far above the 4-bit step survives almost whole; one far below it vanishes (the base's codes come
    back); none at all counts as kept. Reference: the same quantity in float64 from bitsandbytes' round trip."""
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(0)
    W = quant.roundtrip(torch.randn(64, 128, generator=g) * 0.3, quant.QuantSpec(), torch.float32)
    spec = quant.QuantSpec(compute_dtype=torch.float32)

    def bnb_rt(w):
        q, st = bnbF.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        return bnbF.dequantize_4bit(q, st).double()

    for scale, lo, hi in [(1.0, 0.8, 1.2), (1e-4, -0.05, 0.05)]:
        dW = torch.randn(64, 128, generator=g) * scale
        s = Survival()
        s.add(W, W + dW, spec)
        want = float(((bnb_rt(W + dW) - bnb_rt(W)) * dW.double()).sum() / dW.double().square().sum())
        assert s.kept == pytest.approx(want, abs=1e-6) and lo < s.kept < hi
        q0, _ = bnbF.quantize_4bit(W.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        q1, _ = bnbF.quantize_4bit((W + dW).contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        codes = lambda q: torch.stack([q.flatten() >> 4, q.flatten() & 0x0F])  # noqa: E731
        assert s.changed == (codes(q0) != codes(q1)).float().mean().item()
        assert (s.changed > 0.5) == (scale == 1.0)
    empty = Survival()
    empty.add(W, W.clone(), spec)
    assert empty.kept == 1.0 and empty.changed == 0.0


def test_quantized_refuses_when_almost_nothing_survives(tmp_path, capsys):
    base = make_tiny_model(tmp_path / "base", intermediate=128)
    shapes = linear_shapes(base)
    faint = random_adapter(tmp_path / "faint", base, sorted(shapes), shapes, alpha=0.8)  # s·B@A: std ~0.004
    bold = random_adapter(tmp_path / "bold", base, sorted(shapes), shapes, alpha=80.0)  # std ~0.4
    out = tmp_path / "q"
    assert cli(faint, "--format", "quantized", "--out", out) == 2
    err = capsys.readouterr().err
    assert "quantized-adapter" in err and "--allow-lossy" in err and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert cli(faint, "--format", "quantized", "--out", out, "--allow-lossy") == 0
    assert "re-quantizing kept" in capsys.readouterr().out
    assert cli(bold, "--format", "quantized", "--out", tmp_path / "q2") == 0
    assert ex.export(bold, ex.Options("quantized", tmp_path / "q3", progress=False)).survival.kept > 0.5


def _reference_loss(model, examples) -> float:
    """Mean fp32 cross-entropy per label token, one example at a time (no padding): logits[t] vs labels[t+1]."""
    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            lg = model(torch.tensor([e.input_ids])).logits[0].float()
            labels = torch.tensor(e.labels)
            total += F.cross_entropy(lg[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            n += int((labels[1:] != -100).sum())
    return total / n


def test_every_export_reports_its_loss_beside_the_runs(aligned, tmp_path, capsys):
    """merged (fp32) and quantized-adapter keep the training (recovered ~1) and the export loss equals
    transformers' own forward + cross-entropy on the run's validation split; a lossy quantized export is flagged;
    --no-check writes nothing; a GGUF gets FILE.check.json."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.config import load_recipe
    from qlora_kit.data import pipeline as data

    run, _ = aligned
    recipe = load_recipe(run / "recipe.yaml")
    tok = AutoTokenizer.from_pretrained(recipe.model.path)
    examples = data.build(recipe.data, tok, recipe.train.seed).val
    assert len({len(e.input_ids) for e in examples}) > 1  # varying lengths
    checks = {}
    for fmt, extra in [("merged", ["--dtype", "fp32"]), ("quantized-adapter", []), ("quantized", ["--allow-lossy"])]:
        out = tmp_path / fmt
        assert cli(run, "--format", fmt, "--out", out, *extra) == 0
        captured = capsys.readouterr()
        checks[fmt] = c = json.loads((out / "export_check.json").read_text())
        assert c["examples"] == len(examples) and c["format"] == fmt and "validation split" in c["data"]
        assert c["base_loss"] > c["run_loss"] + 0.05  # the training lowered the loss: something to keep
        assert ("warning" in captured.err) == c["lost_most_of_training"] and "check on" in captured.out
    # quantized-adapter is the training-time model bit for bit; the fp32 merge differs from training's bf16
    # residual stream by rounding, which this random 2-layer model amplifies (a trained one far less)
    for fmt, tol in (("merged", 2e-2), ("quantized-adapter", 1e-6)):
        assert checks[fmt]["recovered"] == pytest.approx(1.0, abs=tol)
        assert checks[fmt]["export_loss"] == pytest.approx(checks[fmt]["run_loss"], rel=tol)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert checks["merged"]["export_loss"] == pytest.approx(_reference_loss(merged, examples), rel=1e-5)
    qa = no_cpu_bf16_kernel(AutoModelForCausalLM.from_pretrained(tmp_path / "quantized-adapter"))
    qa = PeftModel.from_pretrained(qa, tmp_path / "quantized-adapter" / "adapter").eval()
    assert checks["quantized-adapter"]["export_loss"] == pytest.approx(_reference_loss(qa, examples), rel=1e-4)
    assert checks["quantized"]["requantized"]["kept"] < 0.5 and checks["quantized"]["recovered"] < 0.9

    assert cli(run, "--format", "merged", "--out", tmp_path / "nc", "--no-check") == 0
    assert not (tmp_path / "nc" / "export_check.json").exists() and "check on" not in capsys.readouterr().out
    assert cli(run, "--format", "gguf", "--gguf-type", "f32", "--out", tmp_path / "m.gguf") == 0
    g = json.loads((tmp_path / "m.check.json").read_text())
    assert g["recovered"] == pytest.approx(1.0, abs=0.02)


def test_an_export_that_lost_the_training_is_flagged(aligned, tmp_path, monkeypatch, capsys):
    """An "export" that is the unquantized base keeps none of the improvement: recovered near 0, a warning on
    stderr naming the format that keeps it, lost_most_of_training in the JSON; the export itself still exits 0."""
    from qlora_kit.infer import export_check

    run, _ = aligned
    real = export_check.load_export
    monkeypatch.setattr(export_check, "load_export", lambda out, *a: real(_base_of(run), *a))
    assert cli(run, "--format", "merged", "--out", tmp_path / "m") == 0
    err = capsys.readouterr().err
    c = json.loads((tmp_path / "m" / "export_check.json").read_text())
    assert c["lost_most_of_training"] and abs(c["recovered"]) < 0.5 and c["run_loss"] < c["base_loss"]
    assert "warning" in err and "lost most of the fine-tune" in err and "quantized-adapter" in err


def test_check_data_for_an_adapter_folder(aligned, tmp_path, capsys):
    """A bare adapter folder has no validation split: the check says so, or measures --check-data."""
    run, path = aligned
    assert cli(run, "--format", "adapter", "--out", tmp_path / "a", "--no-check") == 0
    assert cli(tmp_path / "a", "--format", "merged", "--out", tmp_path / "m1") == 0
    assert "pass --check-data" in capsys.readouterr().out
    assert json.loads((tmp_path / "m1" / "export_check.json").read_text())["export_loss"] is None
    assert cli(tmp_path / "a", "--format", "merged", "--out", tmp_path / "m2", "--check-data", path,
               "--check-format", "alpaca", "--check-examples", "5") == 0
    c = json.loads((tmp_path / "m2" / "export_check.json").read_text())
    assert c["examples"] == 5 and c["run_loss"] < c["base_loss"]
    assert cli(tmp_path / "a", "--format", "merged", "--out", tmp_path / "m3", "--check-data", tmp_path / "nope.jsonl"
               ) == 2
    assert not (tmp_path / "m3").exists()


def test_generate_and_eval_run_a_model_folder_as_stored(aligned, tmp_path, monkeypatch, capsys):
    """Neither command quantizes a model folder (a merged export) unless --quant says so; a run stays as trained."""
    from qlora_kit.infer import generate

    run, path = aligned
    merged = tmp_path / "merged"
    assert cli(run, "--format", "merged", "--out", merged, "--no-check") == 0
    seen = []
    real = generate.load_base

    def spy(model_cfg, quant_cfg, *a, **k):
        seen.append(quant_cfg.type)
        return real(model_cfg, quant_cfg, *a, **k)

    monkeypatch.setattr(generate, "load_base", spy)
    ask = ["--raw", "--prompt", "What is the capital", "--max-new-tokens", "4", "--decode-dtype", "fp32"]
    score = ["--data", str(path), "--format", "alpaca", "--max-length", "64", "--json", "--no-progress"]
    losses = []
    for quant_args in ([], ["--quant", "nf4"]):
        assert main(["generate", str(merged), *ask, *quant_args]) == 0
        assert main(["eval", str(merged), *score, *quant_args]) == 0
        losses.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"])
    assert main(["generate", str(run), *ask]) == 0
    assert seen == ["none", "none", "nf4", "nf4", "nf4"]
    assert losses[0] != losses[1]
