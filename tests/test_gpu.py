"""GPU-only checks (marked `gpu`, skipped without CUDA): training on CUDA, CPU/CUDA quantization agreement,
paged optimizers. CI has no GPU; run them on a GPU machine with `pytest -m gpu`."""

import math

import pytest
import torch

from conftest import tiny_recipe
from qlora_kit import train
from qlora_kit.quant import QuantSpec, dequantize, quantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_cuda_and_cpu_quantize_to_the_same_weights(kind):
    """An adapter trained on a GPU is merged on the CPU by `export`: both must see the same dequant(quant(W))."""
    torch.manual_seed(0)
    w = torch.randn(256, 688, dtype=torch.bfloat16)  # 688 % 64 != 0
    spec = QuantSpec(kind)
    cpu = dequantize(quantize(w, spec), spec, tuple(w.shape), torch.float32)
    gpu = dequantize(quantize(w.cuda(), spec), spec, tuple(w.shape), torch.float32).cpu()
    assert (cpu != gpu).float().mean() < 1e-3  # rounding ties at code midpoints may differ, nothing else


def test_training_on_cuda_lowers_the_loss(tiny_model, tiny_data, tmp_path):
    summary = train.run(tiny_recipe(tiny_model, tiny_data, train={"device": "cuda", "steps": 8}), tmp_path / "run",
                        progress=False)
    import json

    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["peak_memory_bytes"] > 0 and losses[-1] < losses[0]


def test_paged_optimizer_fits_one_batch_on_cuda(tiny_model, tiny_data):
    """A paged 8-bit AdamW must actually step the adapters: repeated steps on one batch drive its loss down."""
    from qlora_kit import data

    p = train.prepare(tiny_recipe(tiny_model, tiny_data, train={"device": "cuda", "optimizer": "paged_adamw8bit"}))
    assert p.accelerator.device.type == "cuda"
    batch = data.collate(p.dataset.train[:2], data.pad_token_id(p.tokenizer))
    losses = [train.train_step(p, [batch], lr=1e-2, max_grad_norm=1.0).loss for _ in range(8)]
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.7 * losses[0], losses
