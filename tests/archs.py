"""The dense architectures the test matrix (tests/test_arch_matrix.py) builds and checks, and the README table
(bench/arch_table.py) that is generated from this list: one list, so the table cannot claim what the matrix does
not test.

Each entry: README name -> (transformers config class, its tiny-model arguments). Every model: hidden 64, 2
layers, 4 heads, MLP 128 (a multiple of bitsandbytes' blocksize 64: its CPU kernels mis-handle other widths).
"""

from __future__ import annotations

import functools

import pytest
import torch

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=128)
_GQA = dict(_COMMON, num_key_value_heads=2)

ARCHS: dict[str, tuple[str, dict]] = {
    "Llama": ("LlamaConfig", _GQA),
    "Mistral": ("MistralConfig", dict(_GQA, sliding_window=None)),
    "Qwen2": ("Qwen2Config", _GQA),
    "Qwen3": ("Qwen3Config", dict(_GQA, head_dim=16)),
    "Gemma": ("GemmaConfig", dict(_GQA, head_dim=16)),
    "Gemma 2": ("Gemma2Config", dict(_GQA, head_dim=16, final_logit_softcapping=2.0, sliding_window=16)),
    "Gemma 3 (text)": ("Gemma3TextConfig", dict(_GQA, head_dim=16, final_logit_softcapping=2.0, sliding_window=16)),
    "Phi-3": ("Phi3Config", _GQA),
    "Phi": ("PhiConfig", _COMMON),
    "Falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "StableLM": ("StableLmConfig", _GQA),
    "Starcoder2": ("Starcoder2Config", dict(_GQA, sliding_window=None)),
    "OLMo 2": ("Olmo2Config", _GQA),
    "Cohere": ("CohereConfig", dict(_GQA, logit_scale=0.25)),
    "Granite": ("GraniteConfig", dict(_GQA, logits_scaling=4.0, embedding_multiplier=2.0,
                                      residual_multiplier=0.5, attention_multiplier=0.25)),
    "GPT-NeoX": ("GPTNeoXConfig", _COMMON),
    "GPT-2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
}
"""Softcaps (2.0) and scales are far from 1 on purpose: logits of this random model span a few units, so a
transform left out moves the loss by far more than rounding (check_head's fake logits test it on [-60, 60])."""


KEEPS_LAYER0_INPUT = {"Granite": "scales its embeddings (embedding_multiplier)",
                      "GPT-2": "adds position embeddings"}
"""Where layer 0's input is not the embedding module's output, re-embedding (lowmem/reembed.py) does not apply and
that layer keeps its input as every other layer does: the same results, L-1 layers' worth of memory saved less.
tests/test_arch_options.py checks this list against what the hook really did."""

NEEDS_HUB_LAYOUT: dict[str, str] = {}
"""Architectures whose saved checkpoints qlora-kit cannot load yet: the matrix expects (strict xfail) the loader's
ModelError, so the day they load, the mark must go and the README table changes with it."""


def tiny_model(name: str, vocab: int, pad: int, bos: int, eos: int):
    """A random fp32 model of architecture `name`, untied embeddings where the family allows (tied ones stay)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls, kwargs = ARCHS[name]
    config = getattr(transformers, cls)(vocab_size=vocab, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                                        **kwargs)
    for k in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, k):
            setattr(config, k, 0.0)  # dropout of the base: training would differ from every reference
    return AutoModelForCausalLM.from_config(config).to(torch.float32)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The test tokenizer (conftest.make_tokenizer), trained once per session: ~1 s each on a busy 2-core machine."""
    from conftest import make_tokenizer

    return make_tokenizer()


@pytest.fixture(autouse=False, scope="module")
def one_thread():
    """One intra-op thread while a module's tiny models run: on a shared 2-core machine, two spinning OpenMP threads
    per op made these tests 3-4x slower (measured: 41 s vs 7 s for GPT-2's options tests at load average 17)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def loss_and_grads(model, vocab: int, lengths: tuple[int, ...] = (40, 23)):
    """The chunked training loss on rows of `lengths` real tokens (padded to the first, 40) and every trainable
    parameter's gradient: what a long-context option must leave exactly as it was."""
    from qlora_kit.train.loss import CausalLMLoss

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (len(lengths), lengths[0]), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        mask[row, n:] = 0  # rows of different lengths
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(2)
    loss, _ = CausalLMLoss(model, chunk=16)(ids, mask, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(g0, g1):
    """Two gradient dicts equal to 1e-4 of each tensor's largest entry."""
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-4 * g0[k].abs().max().item(), msg=k)


def engage(model, *, checkpointing=False, store=None, re_embed=False, chunk=0, lean=False) -> dict:
    """Turn on the long-context options as prepare() does, in its order (checkpointing, offloaded checkpoints,
    re-embedding, tiled MLP, lean norms): {option: what it engaged}, for the option tests to assert on."""
    from qlora_kit.lowmem import lean_norm, offload, reembed, tiled_mlp

    engaged = {}
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if store is not None:
        engaged["offloaded"] = offload.enable(model, store)
    if re_embed:
        engaged["reembed"] = reembed.enable(model)
    engaged["tiled"] = tiled_mlp.tile_mlps(model, chunk)
    if lean:
        engaged["lean"] = lean_norm.make_lean(model)
    return engaged
