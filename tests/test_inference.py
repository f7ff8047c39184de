"""The CPU fast path: dequantize once (bit-for-bit the training forward), fp32 decoding, merged adapters."""

import copy

import torch

from qlora_kit import generate, inference, lora
from qlora_kit.config import QuantConfig
from qlora_kit.quant import QuantLinear


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
    what = inference.for_decoding(fast)
    assert "fp32" in what and "merged" in what
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
