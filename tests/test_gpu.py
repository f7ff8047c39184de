"""GPU-only checks (marked `gpu`): `make test` skips them on a CPU machine; `pytest -m gpu` without CUDA FAILS
(conftest.py). Run on a GPU machine with `pytest -m gpu` or `make gpu-check` (bench/gpu_check.py)."""

import json
import math
import warnings

import pytest
import torch

from conftest import tiny_recipe
from qlora_kit.train import loop as train
from qlora_kit.data import pipeline as data
from qlora_kit.run import checkpoint
from qlora_kit.quant import bnb as quant
from qlora_kit.quant.bnb import QuantLinear, QuantSpec, dequantize, quantize

pytestmark = [pytest.mark.gpu]


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_cuda_and_cpu_quantize_to_the_same_weights(kind):
    """An adapter trained on a GPU is merged on the CPU by `export`: both must see the same dequant(quant(W))."""
    torch.manual_seed(0)
    w = torch.randn(256, 688, dtype=torch.bfloat16)  # 688 % 64 != 0
    spec = QuantSpec(kind)
    cpu = dequantize(quantize(w, spec), spec, tuple(w.shape), torch.float32)
    gpu = dequantize(quantize(w.cuda(), spec), spec, tuple(w.shape), torch.float32).cpu()
    assert (cpu != gpu).float().mean() < 1e-3  # rounding ties at code midpoints may differ, nothing else


def test_int8_codes_identical_on_cpu_and_cuda():
    torch.manual_seed(0)
    w = torch.randn(512, 700, dtype=torch.bfloat16) * torch.logspace(-3, 1, 512, dtype=torch.bfloat16)[:, None]
    spec = QuantSpec("int8")
    cpu, gpu = quantize(w, spec), quantize(w.cuda(), spec)
    assert torch.equal(cpu["qweight"], gpu["qweight"].cpu()) and torch.equal(cpu["scale"], gpu["scale"].cpu())
    d_cpu = dequantize(cpu, spec, tuple(w.shape), torch.bfloat16)
    assert torch.equal(d_cpu, dequantize(gpu, spec, tuple(w.shape), torch.bfloat16).cpu())


@pytest.mark.parametrize("in_features", [4096, 4000])  # 4000 % 64 != 0: bitsandbytes falls back to dequantize
def test_gemv_decode_equals_the_dequantized_matmul(in_features):
    torch.manual_seed(0)
    w = torch.randn(2048, in_features, dtype=torch.bfloat16, device="cuda") * 0.02
    layer = QuantLinear.from_weight(w, QuantSpec("nf4"))
    x = torch.randn(1, 1, in_features, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        fast = layer(x)  # GEMV: one row, no grad, CUDA
        ref = x.float() @ layer.dequantize(torch.float32).T
    assert fast.shape == (1, 1, 2048)
    assert float((fast.float() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


def test_training_on_cuda_lowers_the_loss(tiny_model, tiny_data, tmp_path):
    summary = train.run(tiny_recipe(tiny_model, tiny_data, train={"device": "cuda", "steps": 8}), tmp_path / "run",
                        progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["peak_memory_bytes"] > 0 and losses[-1] < losses[0]


def test_cuda_checkpoint_holds_the_training_device_rng_only(tiny_model, tiny_data, tmp_path):
    train.run(tiny_recipe(tiny_model, tiny_data, train={"device": "cuda", "steps": 2}), tmp_path / "run",
              progress=False)
    _, _, state = checkpoint.load(checkpoint.latest(tmp_path / "run"))
    assert set(state["rng"]) == {"torch", "python", "cuda"} and isinstance(state["rng"]["cuda"], torch.Tensor)


def test_paged_state_is_paged_again_after_resume(tiny_model, tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_model, tiny_data, train={"device": "cuda", "steps": 2, "optimizer": "paged_adamw8bit"},
                         lora={"r": 64})  # r=64 x 14 modules: > 1e5 elements in the flat master, so paged
    train.run(recipe, tmp_path / "run", progress=False)
    _, opt_state, _ = checkpoint.load(checkpoint.latest(tmp_path / "run"))
    p = train.prepare(recipe)
    p.optimizer.load_state_dict(opt_state)
    (state,) = p.optimizer.inner.state.values()
    assert state["state1"].dtype == torch.uint8 and quant.is_paged(state["state1"]) and quant.is_paged(state["state2"])


def test_host_syncs_per_step_on_cuda(tiny_model, tiny_data):
    """Under torch.cuda.set_sync_debug_mode("warn"), count the synchronisations each step makes from qlora_kit's
    own code (the model's and bitsandbytes' are reported by make gpu-check, not asserted here)."""
    p = train.prepare(tiny_recipe(tiny_model, tiny_data, train={"device": "cuda"}, lora={"dropout": 0.0}))
    pad = data.pad_token_id(p.tokenizer)
    micro = [data.collate(p.dataset.train[i : i + 2], pad) for i in (0, 2)]
    train.train_step(p, micro, lr=1e-3, max_grad_norm=1.0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(2):
                train.train_step(p, micro, lr=1e-3, max_grad_norm=1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in seen if "qlora_kit" in w.filename]
    assert len(ours) <= 2 * 2, [(w.filename, w.lineno) for w in ours]


def test_paged_optimizer_fits_one_batch_on_cuda(tiny_model, tiny_data):
    """A paged 8-bit AdamW must actually step the adapters: repeated steps on one batch drive its loss down."""
    from qlora_kit.data import pipeline as data

    p = train.prepare(tiny_recipe(tiny_model, tiny_data, train={"device": "cuda", "optimizer": "paged_adamw8bit"}))
    assert p.accelerator.device.type == "cuda"
    batch = data.collate(p.dataset.train[:2], data.pad_token_id(p.tokenizer))
    losses = [train.train_step(p, [batch], lr=1e-2, max_grad_norm=1.0).loss for _ in range(8)]
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.7 * losses[0], losses
