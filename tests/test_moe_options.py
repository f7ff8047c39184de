"""Every long-context option on the mixture-of-experts architectures (tests/moe_models.py): the same loss and
gradients as without it, in fp32, or a clear refusal. Per architecture, its tiny model loaded as training loads it
(nf4 experts, one QuantLinear per expert and projection) with LoRA on every Linear and every expert (B random, so
every adapter gradient is non-trivial) runs one forward/backward through CausalLMLoss on rows of different lengths:

    plain       no checkpointing, transformers' own norms, untiled MLP / MoE blocks          (the reference)
    options     checkpointing, layer 0 re-embedded, lean norms, tiled MLP and MoE blocks (chunk 8)
    offloaded   checkpointing, offloaded layer inputs, lean norms, tiled MLP and MoE blocks

Routing is per token, so a tile of tokens picks the experts the whole sequence would pick for them; gradients agree
to fp32 summation order (rtol 1e-4 of each tensor's largest entry), the loss to 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from moe_models import MOE, make_moe_model
from qlora_kit.adapters.lora import LoraSpec, LoRALinear, inject
from qlora_kit.config import ModelConfig, QuantConfig
from qlora_kit.lowmem import lean_norm, offload, reembed, tiled_mlp
from qlora_kit.model.load import load_base
from qlora_kit.train.loss import CausalLMLoss

EXPERTS = r".*\.experts\.\d+\.(gate_up_proj|down_proj)"
ATTENTION = r".*\.self_attn\.\w+"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_options")
    return {a: make_moe_model(root / a, a) for a in MOE}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(folder, *, targets="all-linear", checkpointing=False, lean=False, chunk=0, store=None, re_embed=False,
          dropout=0.0):
    """The model as prepare() makes it (options first, adapters after), with every lora_B random."""
    model, _, _ = load_base(ModelConfig(path=str(folder), dtype="fp32"), QuantConfig(type="nf4", compute_dtype="fp32"))
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
    torch.manual_seed(0)
    engaged["adapted"] = inject(model, targets, LoraSpec(4, 8, dropout, dtype=torch.float32))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.train(), engaged


def loss_and_grads(model, vocab=300):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 23:] = 0  # rows of different lengths
    mask[2, 31:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(2)
    loss, _ = CausalLMLoss(model, chunk=16)(ids, mask, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(g0, g1):
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-4 * g0[k].abs().max().item(), msg=k)


@pytest.mark.parametrize("arch", MOE)
def test_long_context_options_are_exact_on_experts(arch, folders):
    loss0, g0 = loss_and_grads(build(folders[arch])[0])
    assert any(".experts." in k and g.abs().sum() > 0 for k, g in g0.items())  # the experts' adapters learn
    model, engaged = build(folders[arch], checkpointing=True, lean=True, chunk=8, re_embed=True)
    loss1, g1 = loss_and_grads(model)
    assert engaged["tiled"] == 2  # both layers: DeepSeek's dense first MLP and every MoE block
    assert engaged["reembed"].stats["packed"] == engaged["reembed"].stats["unpacked"] == 1
    # every RMSNorm lean (2 per layer + the final one, + q/k or latent norms), except gpt-oss': its own forward
    assert engaged["lean"] >= 5 if arch != "gpt_oss" else engaged["lean"] == 0
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert_close(g0, g1)

    store = offload.OffloadStore("cpu")
    model, engaged = build(folders[arch], checkpointing=True, lean=True, chunk=8, store=store)
    loss2, g2 = loss_and_grads(model)
    assert engaged["offloaded"] == 2 and store.stats["packed"] == store.stats["unpacked"] >= 2
    torch.testing.assert_close(loss2, loss0, rtol=1e-6, atol=0)
    assert_close(g0, g2)


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])
def test_replayed_dropout_is_bitwise_plain_dropout_beside_experts(arch, folders, monkeypatch):
    """Dropout on the adapters around the experts (attention; experts' LoRA has none: PEFT's has none, refused in
    test_moe_load.py) replays the same masks in backward."""
    loss0, g0 = loss_and_grads(build(folders[arch], targets=ATTENTION, checkpointing=True, dropout=0.1)[0])
    monkeypatch.setattr(LoRALinear, "replay_dropout", False)
    loss1, g1 = loss_and_grads(build(folders[arch], targets=ATTENTION, checkpointing=True, dropout=0.1)[0])
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


def test_tiling_refuses_an_unknown_or_jittered_mixture(folders):
    """A MoE block qlora-kit does not know to route per token, or Mixtral's in-place router jitter, is refused by
    name rather than tiled into another result."""
    model, _ = build(folders["mixtral"])
    block = model.model.layers[0].mlp
    block.jitter_noise = 0.01
    with pytest.raises(ValueError, match="router_jitter_noise=0.01"):
        tiled_mlp.tile_mlps(model, 8)
    block.jitter_noise = 0.0
    block.__class__ = type("ExpertChoiceBlock", (type(block),), {})
    with pytest.raises(ValueError, match="ExpertChoiceBlock routes tokens to experts"):
        tiled_mlp.tile_mlps(model, 8)
