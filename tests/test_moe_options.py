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

import functools

import pytest
import torch

import archs
from archs import assert_close
from moe_models import MOE, make_moe_model
from qlora_kit.adapters.lora import LoraSpec, LoRALinear, inject
from qlora_kit.config import ModelConfig, QuantConfig
from qlora_kit.lowmem import offload, tiled_mlp
from qlora_kit.model.load import load_base

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
    engaged = archs.engage(model, checkpointing=checkpointing, store=store, re_embed=re_embed, chunk=chunk, lean=lean)
    torch.manual_seed(0)
    engaged["adapted"] = inject(model, targets, LoraSpec(4, 8, dropout, dtype=torch.float32))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.train(), engaged


# batch 3 x 40 tokens, rows of 40, 23 and 31 real
loss_and_grads = functools.partial(archs.loss_and_grads, vocab=300, lengths=(40, 23, 31))


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


# --- DoRA, IA3 and LoftQ on mixture-of-experts models --------------------------------------------------------------
# DoRA and IA3 reach what PEFT can load them on: attention and shared experts (on the experts they are refused,
# test_methods_on_experts_are_refused); LoftQ initialises every adapter, the experts' included.
SHARED = {"qwen2_moe": "shared_expert", "deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts"}
METHODS = {
    "dora+ia3": lambda a: {"lora": {"dora": True, "targets": ATTENTION if a != "qwen2_moe" else
                                    r".*\.(self_attn\.\w+|shared_expert\.\w+)"},
                           "ia3": {"outputs": ["kv_b_proj" if a.startswith("deepseek") else "k_proj"],
                                   "inputs": [f"{SHARED[a]}.down_proj" if a in SHARED else "o_proj"]}},
    # Qwen2-MoE's shared_expert_gate (H -> 1) has rank 1: LoftQ's rank-4 SVD refuses it (test below)
    "loftq": lambda a: {"lora": {"init": "loftq", "loftq_iters": 2} | (
        {"targets": r".*\.(self_attn\.\w+|experts\.\d+\.\w+|shared_expert\.\w+)"} if a == "qwen2_moe" else {})},
}


def _peft_base(folder, spec, offsets):
    """transformers' model from `folder` with every quantized weight (each Linear but lm_head, each expert's slice)
    replaced by what training multiplied by: dequant(quant(W - LoftQ's offset of that module))."""
    from moe_models import reference
    from qlora_kit.export.merge import merge_base_weight

    model = reference(folder).eval()
    head = model.get_output_embeddings()

    def base(name, w):
        return merge_base_weight(w.detach().clone(), spec, torch.float32, "dequantized", offset=offsets.get(name))

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                m.weight.copy_(base(name, m.weight))
            for proj in ("gate_up_proj", "down_proj"):
                p = getattr(m, proj, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                    t = getattr(m, "is_transposed", False)
                    for e in range(p.shape[0]):
                        w = base(f"{name}.{e}.{proj}", p[e].t() if t else p[e])
                        p[e].copy_(w.t() if t else w)
    return model


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", MOE)
def test_method_run_exports_exactly_and_loads_in_peft(arch, method, folders, tmp_path):
    """A 1-step nf4 run: its merged export (loaded by transformers) and PEFT over the base training multiplied by
    (LoRA/DoRA merged, then IA3 over it) give the run's logits on padded rows of different lengths."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import FACTS, tiny_recipe, write_jsonl
    from moe_models import padded_batch
    from qlora_kit.adapters import loftq
    from qlora_kit.export import formats as export
    from qlora_kit.infer import generate
    from qlora_kit.quant.bnb import QuantSpec
    from qlora_kit.train import loop as train

    data = write_jsonl(tmp_path / "d.jsonl", FACTS)
    sections = METHODS[method](arch)
    recipe = tiny_recipe(folders[arch], data, model={"dtype": "fp32"}, quant={"compute_dtype": "fp32"},
                         train={"steps": 1, "batch_size": 2, "lr": 3e-2, "num_threads": 1},
                         **{k: ({"targets": "all-linear"} | v if k == "lora" else v) for k, v in sections.items()})
    run = train.run(recipe, tmp_path / "run", progress=False) and tmp_path / "run"
    ids, mask = padded_batch([13, 6, 9])
    keep = mask.bool()
    with torch.no_grad():
        ours = generate.load(str(run), device="cpu").model(input_ids=ids, attention_mask=mask).logits

    export.export(str(run), export.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                  experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits[keep], ours[keep],
                                   rtol=1e-4, atol=1e-4)

    offsets = loftq.load(run) if method == "loftq" else {}  # module -> (B, A) of W's offset, experts' included
    assert method != "loftq" or any(".experts." in m for m in offsets)
    model = _peft_base(folders[arch], QuantSpec.from_config(recipe.quant), offsets)
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits[keep] - ours[keep]).abs().max() > 1e-3
    folders_ = [run / "adapter"] + ([run / "adapter" / "ia3"] if "ia3" in sections else [])
    for k, f in enumerate(folders_):  # the documented order: LoRA/DoRA merged, then IA3 over it
        model = PeftModel.from_pretrained(model, f).eval()
        if k < len(folders_) - 1:
            model = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[keep], ours[keep],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,sections,why", [
    # Llama's IA3 defaults: inputs down_proj is every expert's down_proj here
    ("qwen3_moe", {"ia3": {}}, r"ia3 on mixture-of-experts weights \(model.layers.0.mlp.experts.0.down_proj\).*"
                               r"ia3.outputs / ia3.inputs"),
    ("gpt_oss", {"lora": {"dora": True}}, r"dora on mixture-of-experts weights.*lora.targets"),
    # PEFT's v4 shim: DeepSeek's dense and shared-expert MLPs go to PEFT as target parameters (plain LoRA only)
    ("deepseek_v3", {"lora": {"dora": True, "targets": r".*\.(self_attn\.\w+|shared_experts\.\w+)"}},
     r"lora.dora with model.layers.1.mlp.shared_experts.\w+_proj adapted: PEFT 0.21 reads a deepseek_v3 adapter"),
    ("qwen2_moe", {"lora": {"init": "loftq"}}, r"lora.r=4 exceeds min\(in, out\)=1 of "
                                               r"model.layers.0.mlp.shared_expert_gate.*without shared_expert_gate"),
    ("deepseek_v2", {"lora": {"dropout": 0.1, "targets": ["kv_b_proj", "down_proj"]}},
     r"lora.dropout=0.1 with model.layers.0.mlp.down_proj.*Set lora.dropout: 0"),
])
def test_methods_peft_cannot_load_are_refused(arch, sections, why, folders, tmp_path):
    """Refused before training with what, why and what to do, never trained and then exported differently."""
    from conftest import FACTS, tiny_recipe, write_jsonl
    from qlora_kit.errors import QloraKitError
    from qlora_kit.train import prepare

    data = write_jsonl(tmp_path / "d.jsonl", FACTS)
    with pytest.raises(QloraKitError, match=why):  # the CLI's exit 2 with this message
        prepare.prepare(tiny_recipe(folders[arch], data, **sections))


# --- several processes ------------------------------------------------------------------------------------------
# DDP on DeepSeek-V3 (dense first layer, shared + routed experts, latent attention) and FSDP2 on gpt-oss (biased,
# clamped experts: their biases are frozen parameters of the experts module, sharded like the codes): 2 ranks on
# gloo x batch 2 equal one process x batch 4 over the same examples, step by step. (An expert no token of a rank's
# share reached would have no gradient there: the flat fp32 gradient holds zeros for it, summed like the rest.)
PARALLEL = {"ddp": "deepseek_v3", "fsdp": "gpt_oss"}


def _dist_recipe(folder, data_path, batch):
    return {"model": {"path": str(folder), "dtype": "fp32"}, "quant": {"compute_dtype": "fp32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"},
            "data": {"path": str(data_path), "max_length": 64, "format": "alpaca"},
            "train": {"steps": 2, "batch_size": batch, "lr": 3e-2, "warmup_steps": 0, "schedule": "constant",
                      "save_every": 0, "device": "cpu", "num_threads": 1, "seed": 5}}


@pytest.fixture(scope="module", autouse=True)
def launched(request, folders, tmp_path_factory):
    """Both 2-rank runs, started through torchrun (accelerate launch is tests/test_distributed.py's) as this module
    begins when its distributed tests are selected, so their start-up overlaps the one-thread tests before them.
    Ranks still running when the module ends (a test failed before waiting) are stopped."""
    import os
    import signal

    from conftest import FACTS, write_jsonl
    from test_distributed import _write, descendants, torchrun

    if not any(item.name.startswith("test_two_ranks") for item in request.session.items):
        return None

    root = tmp_path_factory.mktemp("moe_dist")
    data_path = write_jsonl(root / "d.jsonl", FACTS + [{"instruction": f"Count {i}.", "input": "",
                                                        "output": " ".join(["yes"] * (2 + 5 * i))} for i in range(6)])
    procs = {}
    for mode, arch in PARALLEL.items():
        recipe = _write(root / mode, _dist_recipe(folders[arch], data_path, 2))
        cwd = root / f"cwd-{mode}"
        cwd.mkdir()
        procs[mode] = (torchrun(recipe, cwd / "run", "--set", f"train.parallel={mode}", cwd=cwd), cwd / "run")

    def stop():
        for proc, _ in procs.values():
            if proc.poll() is None:
                for pid in [*descendants(proc.pid), proc.pid]:
                    os.kill(pid, signal.SIGKILL)
                proc.communicate()

    request.addfinalizer(stop)
    return root, data_path, procs


@pytest.mark.parametrize("mode", list(PARALLEL))
def test_two_ranks_equal_one_process_on_experts(mode, launched, folders):
    from qlora_kit.config import recipe_from_dict
    from qlora_kit.run.folder import read_metrics
    from qlora_kit.train import loop as train
    from test_distributed import adapter, finish

    root, data_path, procs = launched
    proc, run = procs[mode]
    _, err = finish(proc)
    assert f"2 processes ({mode})" in err
    single = root / f"single-{mode}"
    train.run(recipe_from_dict(_dist_recipe(folders[PARALLEL[mode]], data_path, 4)), single, progress=False)
    a, b = adapter(run), adapter(single)
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k in a:  # Adam divides a gradient by its own size: on entries whose gradient is near 0 (gpt-oss' clamped
        # gate), fp32 summation-order noise moves the step by up to ~0.3% of lr (7e-5 at lr 3e-2, the same under
        # ddp and fsdp); the losses and gradient norms below agree to 1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-3 * b[k].abs().max().item(), msg=k)
    ours, ref = read_metrics(run), read_metrics(single)
    assert [m["step"] for m in ours] == [1, 2]
    for m, r in zip(ours, ref):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-5) and m["grad_norm"] == pytest.approx(r["grad_norm"],
                                                                                                   rel=1e-4)


def test_recipe_options_train_the_same_steps(folders, tmp_path):
    """Through the recipe (prepare's order and wiring): offloaded checkpoints + tiled MoE blocks train the same two
    steps as checkpointing alone, on gpt-oss (its block's (hidden, router scores) output tiled)."""
    from conftest import FACTS, tiny_recipe, write_jsonl
    from qlora_kit.run.folder import read_metrics
    from qlora_kit.train import loop as train
    from test_distributed import adapter

    data = write_jsonl(tmp_path / "d.jsonl", FACTS)
    runs = {}
    for name, extra in (("plain", {}), ("options", {"offload_activations": True, "mlp_chunk": 8})):
        recipe = tiny_recipe(folders["gpt_oss"], data, model={"dtype": "fp32"}, quant={"compute_dtype": "fp32"},
                             lora={"targets": "all-linear"},
                             train={"steps": 2, "batch_size": 3, "lr": 1e-2, "num_threads": 1, "save_every": 0,
                                    "gradient_checkpointing": True, **extra})
        train.run(recipe, tmp_path / name, progress=False)
        runs[name] = (read_metrics(tmp_path / name), adapter(tmp_path / name))
    (m0, a0), (m1, a1) = runs["plain"], runs["options"]
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m0], rel=1e-6)
    for k in a0:
        torch.testing.assert_close(a1[k], a0[k], rtol=1e-4, atol=1e-3 * a0[k].abs().max().item(), msg=k)


@pytest.mark.parametrize("arch", MOE)
def test_names_peft_rereads_are_peft_s_own(arch):
    """expert_format.peft_reread (which Linears go to PEFT as target parameters) against PEFT's own v4 shim: the
    target_modules names it takes away from a config for this model type are exactly those."""
    from accelerate import init_empty_weights
    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    from moe_models import tiny_model
    from qlora_kit.adapters.expert_format import peft_reread

    with init_empty_weights():
        model = tiny_model(arch, 303, 0, 1, 2)
    names = {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}
    config = LoraConfig(r=4, target_modules=sorted(names))
    convert_peft_config_for_transformers(config, model, None)
    assert names - set(config.target_modules) == names & set(peft_reread(arch))
    assert bool(peft_reread(arch)) == (arch in ("mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3"))
