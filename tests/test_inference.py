"""The CPU fast path: dequantize once (bit-for-bit the training forward), fp32 decoding, merged adapters."""

import copy

import pytest
import torch

from qlora_kit.infer import generate, inference
from qlora_kit.adapters import lora
from qlora_kit.config import QuantConfig
from qlora_kit.quant.bnb import QuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _with_adapter(tiny_model):
    loaded = generate.load(str(tiny_model), quant=QuantConfig("nf4"))
    lora.inject(loaded.model, "all-linear", lora.LoraSpec(4, 8.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in loaded.model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)  # a trained-looking adapter, so merging has something to merge
    return loaded


def test_densify_is_bit_for_bit_and_for_decoding_close(tiny_model):
    loaded = _with_adapter(tiny_model)
    ids = torch.tensor([[1, 5, 9, 30, 42, 7, 100, 3]])
    want = _logits(loaded.model, ids)
    dense = copy.deepcopy(loaded.model)
    assert inference.densify(dense)
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    assert torch.equal(_logits(dense, ids), want)  # the same dequantized values, the same bf16 matmuls

    fast = copy.deepcopy(loaded.model)
    what = inference.for_decoding(fast, dtype="fp32")
    assert "fp32" in what and "merged" in what and "fp16" not in what
    assert not any(isinstance(m, (QuantLinear, lora.LoRALinear)) for m in fast.modules())
    unmerged = copy.deepcopy(dense).float()
    ref = _logits(unmerged, ids)  # fp32, adapter separate
    assert torch.allclose(_logits(fast, ids), ref, rtol=1e-4, atol=1e-4)  # merging in fp32 is (nearly) exact
    assert (_logits(fast, ids) - want).abs().max() < 0.05 * want.abs().max()  # fp32 vs bf16 compute: close


def test_generate_fast_path_answers_like_the_quantized_model(tiny_model):
    loaded = _with_adapter(tiny_model)
    before = generate.answer(loaded, ["What is the capital of Veloria 1?"], max_new_tokens=6)
    assert "merged" in generate.speed_up(loaded)
    assert generate.answer(loaded, ["What is the capital of Veloria 1?"], max_new_tokens=6) == before


def test_densify_declines_when_memory_is_short(tiny_model, monkeypatch):
    loaded = generate.load(str(tiny_model), quant=QuantConfig("nf4"))
    monkeypatch.setattr(inference, "available_bytes", lambda: 1000)
    assert not inference.densify(loaded.model)
    assert "unchanged" in inference.for_decoding(loaded.model)
    assert any(isinstance(m, QuantLinear) for m in loaded.model.modules())


def _fed_lengths(model, run) -> list[int]:
    """The sequence length of input_ids at every forward of `model` while `run()` generates."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_generate_feeds_one_token_per_step_through_the_kv_cache(tiny_model):
    """load_base turns the cache off for training (config.use_cache False, which transformers copies into the
    generation config); without the cache every new token re-ran the whole sequence (O(n^2), ~5x slower for 64
    tokens on the demo model). After the prompt, each step must feed exactly one token."""
    loaded = generate.load(str(tiny_model), quant=QuantConfig("nf4"))
    lens = _fed_lengths(loaded.model, lambda: generate.answer(loaded, ["hello world"], max_new_tokens=5))
    assert len(lens) >= 2 and lens[0] > 1 and set(lens[1:]) == {1}, lens
    many = generate.load_many(str(tiny_model), {}, quant=QuantConfig("nf4"))
    lens = _fed_lengths(many.model, lambda: generate.answer_routed(many, ["hello", "a longer prompt"], [None, None],
                                                                   max_new_tokens=5))
    assert len(lens) >= 2 and set(lens[1:]) == {1}, lens


def test_fp16_holds_every_bf16_weight_in_its_normal_range_exactly():
    """HalfLinear's premise: a dequantized (bf16) weight survives the cast to fp16 unless |w| < 2^-14 or > 65504."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.bfloat16).double()
    v = v[torch.isfinite(v)]
    exact = v.half().double() == v
    normal = (v.abs() >= 2.0**-14) & (v.abs() <= 65504)
    assert bool(exact[normal].all()) and bool(exact[v == 0].all())
    assert not bool(exact[(v.abs() > 0) & (v.abs() < 2.0**-24)].any())  # below fp16's smallest subnormal: lost


def test_half_linear_against_float64():
    torch.manual_seed(0)
    dense = torch.nn.Linear(1536, 576, bias=True)
    with torch.no_grad():
        dense.weight.copy_(dense.weight.bfloat16().float())  # bf16 values, as dequantized weights are
    half = inference.HalfLinear(dense)
    normal = dense.weight.abs() >= 2.0**-14
    assert half.weight.dtype == torch.float16 and torch.equal(half.weight.float()[normal], dense.weight[normal])
    W, b = half.weight.double(), dense.bias.double()  # the weights as stored (the few tiny ones rounded)
    x = torch.randn(1, 1, 1536)
    y = half(x)
    assert y.dtype == torch.float32 and y.shape == (1, 1, 576)
    xw = x.half().double() @ W.T  # the fp16-rounded input, exact products and sums; the bias is added in fp32
    # fp32 accumulation: the error is the fp16 rounding of x·W^T (half an ulp, 2^-11 relative), not 1536 partial sums
    assert ((y.double() - (xw + b)).abs() <= xw.abs() * 2.0**-11 + 1e-6).all()
    x3 = torch.randn(2, 5, 1536)  # 10 rows (a prompt): fp32 over the same weights
    assert torch.allclose(half(x3).double(), x3.double() @ W.T + b, rtol=1e-5, atol=1e-5)
    big = torch.full((1, 1536), 1.0e5)  # beyond fp16's range: the fp32 fallback, finite and right
    assert torch.allclose(half(big).double(), big.double() @ W.T + b, rtol=1e-5, atol=1.0)  # |y| ~ 1e4-1e5


def test_decode_dtype_fp16_answers_like_fp32(tiny_model):
    loaded = _with_adapter(tiny_model)
    ids = torch.tensor([[1, 5, 9, 30, 42, 7, 100, 3]])
    fp32 = copy.deepcopy(loaded.model)
    assert "fp16" not in inference.for_decoding(fp32, dtype="fp32")
    what = generate.speed_up(loaded, dtype="fp16")
    assert "merged" in what and "Linear weights in fp16" in what
    assert all(type(m) is not torch.nn.Linear for m in loaded.model.modules())
    want = _logits(fp32, ids)
    # merged weights round to fp16's 11 bits; 1 row also multiplies in fp16, 8 rows (a prompt) in fp32
    for n in (1, 8):
        assert (_logits(loaded.model, ids[:, :n]) - want[:, :n]).abs().max() < 2e-3 * want.abs().max()
    prompts = ["What is the capital of Veloria 1?", "hello world"]
    ref = generate.Loaded(fp32, loaded.tokenizer, loaded.data_format, loaded.system_prompt)
    assert generate.answer(loaded, prompts, max_new_tokens=8) == generate.answer(ref, prompts, max_new_tokens=8)
    with pytest.raises(ValueError, match="decode dtype"):
        inference.for_decoding(copy.deepcopy(fp32), dtype="int3")
