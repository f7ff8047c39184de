"""Long-context options are exact: offloaded checkpoints (bitwise), replayed LoRA dropout (bitwise, same seed),
tiled MLP (allclose in fp32), and attention that never holds (S, S) scores."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import transformers

from qlora_kit.lowmem import offload, tiled_mlp
from qlora_kit.adapters.lora import LoraSpec, LoRALinear, inject

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def build(dtype=torch.bfloat16, dropout=0.1, store=None, chunk=0, checkpointing=True):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="sdpa")).to(dtype)
    inject(model, "all-linear", LoraSpec(8, 16, dropout, dtype=dtype))
    with torch.no_grad():  # B = 0 would make every adapter gradient but B's trivially equal
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if store is not None:
        assert offload.enable(model, store) == TINY["num_hidden_layers"]
    assert tiled_mlp.tile_mlps(model, chunk) == (TINY["num_hidden_layers"] if chunk else 0)
    return model.train()


def loss_and_grads(model, seq=32, seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(0, 128, (2, seq))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_offload_gradients_bitwise_equal_and_bytes_on_host():
    plain = build()
    store = offload.OffloadStore("cpu")
    model = build(store=store)
    # batches of varying length, as real data: a step after a longer one reuses larger host buffers for a
    # smaller (B, S, H), then a longer one needs new ones
    seqs = [32, 32, 61, 17, 40]
    for seq in seqs:
        loss0, g0 = loss_and_grads(plain, seq=seq)
        plain.zero_grad(set_to_none=True)
        loss1, g1 = loss_and_grads(model, seq=seq)
        model.zero_grad(set_to_none=True)
        assert torch.equal(loss0, loss1), seq
        assert_equal(g0, g1)
    L = TINY["num_hidden_layers"]
    assert store.stats["packed"] == store.stats["unpacked"] == len(seqs) * L
    assert store.stats["prefetch_hits"] == len(seqs) * (L - 1)  # every layer but the last-run one came prefetched
    # the pool: allocated for seq 32, grown once for 61; 17 and 40 reuse the 61-token buffers
    layer_input = 2 * TINY["hidden_size"] * 2  # (B, 1, H) bf16
    assert store.host_bytes() == L * layer_input * (32 + 61)


def test_offload_releases_device_copies_after_forward():
    """Without offload every layer input stays referenced until backward; with it, none does."""
    def surviving(store):
        model = build(store=store)
        refs = []
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
        ids = torch.randint(0, 128, (1, 16))
        loss = model(input_ids=ids, labels=ids).loss
        gc.collect()
        alive = sum(r() is not None for r in refs)
        loss.backward()
        return alive

    assert surviving(None) == TINY["num_hidden_layers"]
    assert surviving(offload.OffloadStore("cpu")) == 0


def test_reembedded_layer0_input_bitwise_equal_and_not_kept():
    """Layer 0's checkpoint keeps the token ids and re-embeds its input in backward: bitwise the same loss and
    gradients (dropout on: the recompute's masks must match too), and the (B, S, H) input is not kept."""
    from qlora_kit.lowmem import reembed

    loss0, g0 = loss_and_grads(build())
    model = build()
    r = reembed.enable(model)
    for _ in range(2):
        loss1, g1 = loss_and_grads(model)
        model.zero_grad(set_to_none=True)
        assert torch.equal(loss0, loss1)
        assert_equal(g0, g1)
    assert r.stats == {"packed": 2, "unpacked": 2}

    refs = []
    model.model.layers[0].register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
    ids = torch.randint(0, 128, (1, 16))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    assert refs[0]() is None  # freed after the forward: only the ids stand for it
    loss.backward()


def test_offload_needs_checkpointing(tmp_path):
    from qlora_kit.config import recipe_from_dict
    from qlora_kit.errors import ConfigError
    from qlora_kit.train.loop import prepare

    recipe = recipe_from_dict({"model": {"path": str(tmp_path)}, "data": {"path": str(tmp_path / "x.jsonl"),
                                                                           "format": "text"},
                               "train": {"offload_activations": True, "gradient_checkpointing": False}})
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        prepare(recipe)


@pytest.mark.parametrize("checkpointing,keep_masks", [(False, True), (True, True), (True, False)])
def test_replayed_dropout_equals_plain_dropout_for_the_same_seed(monkeypatch, checkpointing, keep_masks):
    """dropout_replay's own mask (a bool mask on the CPU, drawn again in a checkpoint's recompute) gives bitwise
    nn.Dropout's results, with and without checkpointing; so does the RNG-state replay CUDA uses (run here on the
    CPU with KEEP_CPU_MASKS off)."""
    from qlora_kit.lowmem import dropout_replay

    monkeypatch.setattr(dropout_replay, "KEEP_CPU_MASKS", keep_masks)
    loss0, g0 = loss_and_grads(build(checkpointing=checkpointing))
    monkeypatch.setattr(LoRALinear, "replay_dropout", False)
    loss1, g1 = loss_and_grads(build(checkpointing=checkpointing))
    assert torch.equal(loss0, loss1)
    assert_equal(g0, g1)


def test_replayed_dropout_saves_the_shared_input_once():
    """q, k, v read one (T, H) input: the adapters save that tensor (once) and on the CPU a bool mask each, not
    three dropped copies + bf16 noise tensors."""
    spec = LoraSpec(4, 8, 0.1)
    mods = [LoRALinear(torch.nn.Linear(32, n, dtype=torch.bfloat16), spec) for n in (32, 16, 16)]
    x = torch.randn(2, 64, 32, dtype=torch.bfloat16, requires_grad=True)

    def saved_bytes():
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        params = {p.untyped_storage().data_ptr() for m in mods for p in m.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sum(m(x).sum() for m in mods)
        return sum(n for ptr, n in seen.items() if ptr not in params)

    r, T = 4, 2 * 64
    # x itself + each adapter's (T, 32) bool mask and (T, r) hidden saved by lora_B; the base Linears save x too
    # (same storage)
    assert saved_bytes() == 2 * T * 32 + 3 * (T * 32 + 2 * T * r)
    LoRALinear.replay_dropout = False
    try:  # plain nn.Dropout: per adapter a dropped copy and a bf16 noise tensor on the CPU
        assert saved_bytes() == 2 * T * 32 + 3 * (2 * 2 * T * 32 + 2 * T * r)
    finally:
        LoRALinear.replay_dropout = True


def test_tiled_mlp_gradients_allclose_fp32():
    loss0, g0 = loss_and_grads(build(torch.float32, dropout=0.0), seq=37)
    loss1, g1 = loss_and_grads(build(torch.float32, dropout=0.0, chunk=8), seq=37)  # 5 chunks, the last one short
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6 * g0[k].abs().max().item())


def test_tiled_mlp_backward_replays_the_forward_dropout_masks():
    """With dropout, the tiled MLP's backward must see the masks its forward drew: compare with the same chunks
    run under plain autograd from the same RNG state."""
    mlp = build(torch.float32, dropout=0.3, chunk=1000).model.layers[0].mlp  # seq 20 <= 1000: untiled for now
    x = torch.randn(2, 20, 64, requires_grad=True)
    torch.manual_seed(5)
    ref = torch.cat([mlp._untiled_forward(piece) for piece in x.split(6, dim=1)], dim=1)
    gx0, *gp0 = torch.autograd.grad(ref.square().sum(), [x, *[p for p in mlp.parameters() if p.requires_grad]])
    mlp.mlp_chunk = 6
    torch.manual_seed(5)
    out = mlp(x)
    assert torch.equal(out, ref)
    gx1, *gp1 = torch.autograd.grad(out.square().sum(), [x, *[p for p in mlp.parameters() if p.requires_grad]])
    torch.testing.assert_close(gx1, gx0)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b)


def test_attention_never_materialises_seq_by_seq_scores():
    """One Llama attention block at seq 8192 on the CPU (SDPA, causal, no padding mask): the largest tensor alive
    in forward + backward is O(S), far below one head's (S, S) fp32 scores (256 MiB)."""
    config = transformers.LlamaConfig(**{**TINY, "hidden_size": 32}, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    attn, S = model.model.layers[0].self_attn, 8192
    x = torch.randn(1, S, 32, dtype=torch.bfloat16, requires_grad=True)
    pe = model.model.rotary_emb(x, torch.arange(S)[None])
    with torch.profiler.profile(profile_memory=True) as prof:
        out, _ = attn(x, position_embeddings=pe, attention_mask=None)
        out.float().sum().backward()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes and max(sizes) < 4 * 2**20  # largest single allocation: a few (S, H) tensors' worth, not S^2
    assert max(sizes) < S * S * 4 / 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rmsnorm_forward_bitwise_gradients_allclose(dtype):
    """The lean RMSNorm against transformers' own module under autograd (an independent reference): the same
    output bit for bit, gradients (input and weight) allclose; it saves x and the (rows, 1) rsqrt only."""
    from qlora_kit.lowmem import lean_norm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ref, lean = LlamaRMSNorm(96, eps=1e-5), LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_(1, 0.2)
    lean.load_state_dict(ref.state_dict())
    ref, lean = ref.to(dtype), lean.to(dtype)
    assert lean_norm.make_lean(lean) == 1
    x = (torch.randn(3, 50, 96) * 3).to(dtype)
    grad_y = torch.randn(3, 50, 96).to(dtype)
    outs, grads = [], []
    for m in (ref, lean):
        xi = x.clone().requires_grad_(True)
        saved = []

        def pack(t, saved=saved):
            saved.append(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m(xi)
        y.backward(grad_y)
        outs.append(y.detach())
        grads.append((xi.grad, m.weight.grad))
        nbytes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                  if t.untyped_storage().data_ptr() not in (m.weight.untyped_storage().data_ptr(),
                                                            xi.untyped_storage().data_ptr())}
    assert torch.equal(outs[0], outs[1])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
    torch.testing.assert_close(grads[1][1], grads[0][1], **tol)
    assert sum(nbytes.values()) == 4 * 3 * 50  # beyond x and the weight: the (3, 50, 1) fp32 rsqrt
    with torch.no_grad():  # and without gradients it is the module's own forward
        assert torch.equal(lean(x), ref(x))


def test_lean_norms_and_fused_final_norm_match_transformers_training_step():
    """A tiny Llama with lean norms (the final one applied per loss chunk by CausalLMLoss) against the same model
    as transformers builds it: the loss is bitwise equal, every adapter gradient allclose (fp32)."""
    from qlora_kit.lowmem import lean_norm
    from qlora_kit.train.loss import CausalLMLoss

    def run(lean):
        model = build(torch.float32, dropout=0.0)
        if lean:
            assert lean_norm.make_lean(model) == 2 * TINY["num_hidden_layers"] + 1
        torch.manual_seed(1)
        ids = torch.randint(0, 128, (2, 40))
        loss, n = CausalLMLoss(model, chunk=16)(ids, torch.ones_like(ids), ids)
        loss.backward()
        assert not model.model.norm.__dict__.get("deferred", False)  # restored after the forward
        return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    loss0, g0 = run(False)
    loss1, g1 = run(True)
    assert torch.equal(loss0, loss1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6 * g0[k].abs().max().item())
