"""Every long-context option on every dense architecture of the matrix (tests/archs.py): the same loss and
gradients as without it, in fp32, or a clear refusal. Per architecture, one tiny model with LoRA on all linears (B
random, so every adapter gradient is non-trivial) runs one forward/backward through CausalLMLoss:

    plain       no checkpointing, transformers' own norms, untiled MLPs           (the reference)
    options     checkpointing, layer 0 re-embedded, lean norms, tiled MLP (chunk 8)
    offloaded   checkpointing, offloaded layer inputs, lean norms, tiled MLP
    dropout     LoRA dropout 0.1: replayed (dropout_replay) == nn.Dropout for the same seed, bitwise

A tiled MLP recomputes per chunk and a lean norm differentiates by hand: gradients agree to fp32 summation order
(rtol 1e-4 of each tensor's largest entry), the loss bitwise or to 1e-6.
"""

from __future__ import annotations

import functools

import pytest
import torch

import archs
from archs import assert_close, one_thread  # noqa: F401 (one_thread: a fixture)
from qlora_kit.adapters.lora import LoraSpec, LoRALinear, inject
from qlora_kit.lowmem import offload, tiled_mlp
from qlora_kit.model.load import linear_from_conv1d

LAYERS = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def build(name, *, checkpointing=False, lean=False, chunk=0, store=None, re_embed=False, dropout=0.0):
    tok = archs.tokenizer()
    torch.manual_seed(0)
    model = archs.tiny_model(name, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    linear_from_conv1d(model)  # GPT-2's Conv1D as the Linear load_base makes of it
    inject(model, "all-linear", LoraSpec(4, 8, dropout, dtype=torch.float32))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    engaged = archs.engage(model, checkpointing=checkpointing, store=store, re_embed=re_embed, chunk=chunk, lean=lean)
    return model.train(), engaged


# batch 2 x 40 tokens, the second row 23 real
loss_and_grads = functools.partial(archs.loss_and_grads, vocab=303)


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_long_context_options_are_exact(name):
    loss0, g0 = loss_and_grads(build(name)[0])
    model, engaged = build(name, checkpointing=True, lean=True, chunk=8, re_embed=True)
    loss1, g1 = loss_and_grads(model)
    assert engaged["tiled"] == LAYERS  # every decoder layer's MLP, whatever its layout (fc1/fc2, c_fc, ...)
    stats = engaged["reembed"].stats  # layer 0's input re-embedded, unless it is not the embedding output
    assert stats["packed"] == stats["unpacked"] == (0 if name in archs.KEEPS_LAYER0_INPUT else 1)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert_close(g0, g1)

    store = offload.OffloadStore("cpu")
    model, engaged = build(name, checkpointing=True, lean=True, chunk=8, store=store)
    loss2, g2 = loss_and_grads(model)
    assert engaged["offloaded"] == LAYERS and store.stats["packed"] == store.stats["unpacked"] >= LAYERS
    torch.testing.assert_close(loss2, loss0, rtol=1e-6, atol=0)
    assert_close(g0, g2)


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_replayed_dropout_is_bitwise_plain_dropout(name, monkeypatch):
    loss0, g0 = loss_and_grads(build(name, checkpointing=True, dropout=0.1)[0])
    monkeypatch.setattr(LoRALinear, "replay_dropout", False)
    loss1, g1 = loss_and_grads(build(name, checkpointing=True, dropout=0.1)[0])
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


def test_tiled_mlp_refuses_a_decoder_layer_without_an_mlp():
    """A layer whose MLP is not its `mlp` child would silently stay untiled: refused, naming the layer."""
    model, _ = build("Llama")
    del model.model.layers[1].mlp
    with pytest.raises(ValueError, match="LlamaDecoderLayer without one"):
        tiled_mlp.tile_mlps(model, 8)
    assert tiled_mlp.tile_mlps(model, 0) == 0  # off: nothing to check
