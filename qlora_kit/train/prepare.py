"""Everything one training step needs, built from a recipe: `prepare(recipe) -> Prepared`.

Order matters and each check fails before the expensive part it guards: cheap recipe checks (device, optimizer,
data file, trackers) -> the quantized base loaded (sharded as it loads under fsdp) -> activation checkpointing,
offload, tiled MLP and lean norms -> adapters injected (LoRA / DoRA / IA3, LoftQ init) -> data built -> the flat-master
optimizer (LoRA+ groups) -> the loss module (sharded root under fsdp). train.py runs the steps; bench/ and tests
call `prepare` directly.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import fits, fsdp, trackers
from ..data import pipeline as data
from ..adapters import lora, methods
from ..lowmem import host_memory, lean_norm, reembed, tiled_mlp
from ..lowmem import offload as offload_mod
from ..config import Recipe
from ..device import allow_tf32
from .distributed import World, parallel_mode
from ..errors import ConfigError
from .loss import CausalLMLoss
from .preference import PreferenceLoss
from ..model.load import load_base, resolve
from ..quant import mxfp4
from .optim import LossScaler, MasterWeightOptimizer, ParamGroup, build_optimizer

if TYPE_CHECKING:  # annotations only: importing either costs seconds, and prepare() imports accelerate anyway
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


@dataclass
class Prepared:
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    loss_fn: torch.nn.Module  # CausalLMLoss or preference.PreferenceLoss, possibly wrapped by accelerate
    optimizer: MasterWeightOptimizer
    dataset: data.Dataset
    targets: list[str]
    report: lora.ParamReport
    recipe: Recipe  # what it was prepared from: run's logging and finish read train/lora settings here
    world: World = field(default_factory=World)
    parallel: str = "single"  # single | ddp | fsdp: what this run does (train.parallel resolved for the world)
    load_peak_bytes: int = 0  # fsdp: frozen bytes this rank held at the worst moment of loading
    loftq: object = None  # loftq.Initializer of a LoftQ run: its offsets (saved in the run) and the time it took
    methods: dict[str, list[str]] = field(default_factory=dict)  # method (lora | dora | ia3) -> modules it adapts
    counts: dict[str, int] = field(default_factory=dict)  # method -> trainable parameters
    offload: offload_mod.OffloadStore | None = None  # train.offload_activations: layer inputs on the host
    base_stored: str | None = None  # "mxfp4": the base's experts came MXFP4-packed (decoded, then quantized)


def lora_spec(recipe: Recipe) -> lora.LoraSpec:
    from ..quant.bnb import DTYPES

    c = recipe.lora
    return lora.LoraSpec(c.r, c.alpha, c.dropout, c.init, c.rslora, DTYPES[recipe.quant.compute_dtype])


def prepare(recipe: Recipe, world: World | None = None, loftq_offsets: dict | None = None) -> Prepared:
    """`loftq_offsets`: a resumed LoftQ run's stored offsets (its base must be quantized exactly as before)."""
    from accelerate import Accelerator

    world = world or World()
    mode = parallel_mode(recipe.train.parallel, world)
    t = recipe.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.return_freed_memory and not host_memory.return_freed_memory() and world.rank == 0:
        print("note: train.return_freed_memory has no effect here: this C library's malloc does not take glibc's "
              "settings.", file=sys.stderr)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA GPU is visible; use train.device=auto or cpu.")
    if t.optimizer.startswith("paged") and not torch.cuda.is_available():
        raise ConfigError(f"train.optimizer={t.optimizer} pages optimizer state through CUDA unified memory, "
                          "which needs a CUDA GPU; use adamw or adamw8bit on the CPU.")
    if t.offload_activations and not t.gradient_checkpointing:
        raise ConfigError("train.offload_activations moves the checkpointed layer inputs to host memory, so it "
                          "needs train.gradient_checkpointing=true; turn one on or the other off.")
    data.check(recipe.data)  # a bad line fails now, not after a long model load
    trackers.check_installed(t.report_to)  # so does a tracker that is not installed
    accelerator = Accelerator(cpu=t.device == "cpu", mixed_precision="no")  # dtypes are ours: bf16 compute
    seed_everything(t.seed)  # the same on every rank: the adapters start identical everywhere
    init = None
    if recipe.lora.init == "loftq":
        if recipe.quant.type == "none":
            raise ConfigError("lora.init loftq cancels the quantization error of the base, and quant.type is none: "
                              "there is none. Set quant.type to nf4, fp4 or int8, or lora.init to kaiming.")
        from ..adapters.loftq import Initializer
        from ..quant.bnb import QuantSpec

        init = Initializer(recipe.lora.targets, QuantSpec.from_config(recipe.quant), recipe.lora.r,
                           lora_spec(recipe).scaling, recipe.lora.loftq_iters, loftq_offsets)
    device, sharder = accelerator.device, fsdp.LoadSharder(world, accelerator.device)
    fits.check(recipe, resolve(recipe.model.path), device)  # a step the machine cannot hold: refused, not begun
    model, tokenizer, folder = load_base(recipe.model, recipe.quant, device, sharder if mode == "fsdp" else None,
                                    before_quantize=init)
    if t.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs, no `enable_input_require_grads` hack, RNG (dropout) replayed.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    offload = offload_mod.OffloadStore(accelerator.device) if t.offload_activations else None
    if offload is not None and not offload_mod.enable(model, offload):  # layer inputs to host memory
        raise ConfigError(f"train.offload_activations: {type(model).__name__} has no checkpointed decoder layers "
                          "whose inputs could be offloaded; set train.offload_activations: false.")
    elif t.gradient_checkpointing and mode != "fsdp":  # layer 0 keeps the token ids, not its (B, S, H) input
        # (under fsdp the embeddings are a sharded unit: a lookup in backward would need its own all-gather)
        reembed.enable(model)
    try:
        tiled_mlp.tile_mlps(model, t.mlp_chunk)
    except ValueError as e:
        raise ConfigError(f"{e}.") from None
    lean_norm.make_lean(model)  # RMSNorms save their 16-bit input, not an fp32 copy; the loss head runs the final one
    _check_rank(model, recipe)
    try:
        adapted = methods.inject(model, recipe.lora, recipe.ia3, lora_spec(recipe).dtype)
    except ValueError as e:
        hint = ("; set lora.targets to some of them, or all-linear"
                if "matched no Linear" in str(e) and not str(e).startswith("ia3") else "")
        raise ConfigError(f"{e}{hint}.") from None
    targets = sorted({m for mods in adapted.values() for m in mods})
    if init is not None:
        init.apply(model)  # A and B from LoftQ (nothing on resume: the checkpoint brings them)
    model.train()
    dataset = data.build(recipe.data, tokenizer, t.seed, paired=t.objective != "kto")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if t.optimizer != "adamw":
        _probe_bnb_optimizer(t, accelerator.device)
    optimizer = build_optimizer(param_groups(named, recipe.lora.plus_ratio), t)
    if model.get_input_embeddings().weight.dtype == torch.float16:  # model.dtype fp16, or auto without bf16
        optimizer.scaler = LossScaler()
    from ..quant.bnb import DTYPES

    if allow_tf32(accelerator.device, DTYPES[recipe.quant.compute_dtype]):
        print("quant.compute_dtype fp32 on CUDA: matmuls use TF32 tensor cores "
              "(torch.set_float32_matmul_precision('high')); pure fp32 would be ~10x slower.", file=sys.stderr)
    report = lora.param_report(model)
    loss_fn = CausalLMLoss(model, t.loss_chunk) if t.objective == "sft" else PreferenceLoss(model, t)
    if mode == "fsdp":
        sharder.shard_root(loss_fn, model)
    elif mode == "single":
        loss_fn = accelerator.prepare(loss_fn)
    # ddp/fsdp: no DDP wrapper; train_step sums the adapters' gradients once per step (distributed.py)
    if world.distributed:  # dropout differs per rank from here on (the adapters were initialised identically)
        torch.manual_seed((t.seed + 1_000_003 * world.rank) % 2**63)
        random.seed(t.seed + 1_000_003 * world.rank)
    return Prepared(accelerator, model, tokenizer, loss_fn, optimizer, dataset, targets, report, recipe, world, mode,
                    sharder.load_peak, init, adapted, methods.param_counts(model), offload,
                    "mxfp4" if mxfp4.is_mxfp4_folder(folder) else None)


def param_groups(named: list[tuple[str, torch.nn.Parameter]], plus_ratio: float) -> list[ParamGroup]:
    """LoRA+ (Hayou et al. 2024, arXiv 2402.12354): every lora_B in a group at plus_ratio x the lr, the rest (A,
    DoRA magnitudes, IA3 vectors) at the lr. Ratio 1: one group, exactly plain LoRA's optimizer."""
    if plus_ratio == 1.0:
        return [ParamGroup([p for _, p in named])]
    is_b = [n.endswith(".lora_B.weight") for n, _ in named]
    return [ParamGroup([p for (_, p), b in zip(named, is_b) if not b]),
            ParamGroup([p for (_, p), b in zip(named, is_b) if b], lr_ratio=plus_ratio)]


def _check_rank(model: torch.nn.Module, recipe: Recipe) -> None:
    """An adapter's rank cannot exceed min(in, out) of its layer; a larger r only wastes memory, and an absurd one
    (a typo, r: 16000000) would try to allocate terabytes before any other check could speak."""
    chosen = lora.match_targets(lora.linear_names(model), recipe.lora.targets) if recipe.lora.targets != [] else []
    mods = [model.get_submodule(n) for n in chosen]
    limit = max((min(m.in_features, m.out_features) for m in mods), default=0)
    if mods and recipe.lora.r > limit:
        raise ConfigError(f"lora.r={recipe.lora.r} is larger than any targeted layer allows (rank <= min(in, out) = "
                          f"{limit} at most here); set lora.r to {min(16, limit)} or another value <= {limit}.")


PROBE_SHAPE = (2, 64, 2048)  # one r=64 adapter pair on hidden 2048: 262,144 elements


def _probe_bnb_optimizer(t, device: torch.device) -> None:
    """Step a throwaway bitsandbytes optimizer once, so a machine where its kernels cannot run fails here with the
    fix, not with a RuntimeError at step 1. Realistic size (PROBE_SHAPE, 1 MiB fp32): bitsandbytes keeps tensors
    under 4,096 elements in 32-bit state and pages only tensors of at least 1e5 elements, so a smaller probe would
    not exercise the 8-bit or the paged kernels the run will use."""
    from ..quant.bnb import bnb_optimizer

    try:
        w = torch.zeros(PROBE_SHAPE, device=device, requires_grad=True)
        w.grad = torch.ones_like(w)
        bnb_optimizer(t.optimizer, [w], 1e-3, 0.0).step()
    except Exception as e:  # any failure of the probe means "not on this machine"; the message carries the cause
        raise ConfigError(f"train.optimizer={t.optimizer}: bitsandbytes cannot run it on {device.type} here "
                          f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}). Use "
                          "train.optimizer=adamw, or install a bitsandbytes build that supports this machine."
                          ) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
