"""The training loop, written out (no Trainer, no callbacks): load -> inject -> data -> steps -> adapter.

`prepare()` builds everything a step needs; `train_step()` is the one step function, reused by bench/;
`run()` is `qlora-kit train`: the loop with logging, validation, checkpoints, resume and clean stops.
Device placement goes through accelerate's Accelerator, so the same loop runs on the CPU and on one CUDA GPU (chosen
automatically). Several processes (torchrun / accelerate launch) share one run as distributed.py describes: a
disjoint share of every global batch per rank, one sum of the adapter gradients per step, rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from . import atomic, checkpoint, data, fsdp, lora, methods, tiled_mlp, trackers
from . import offload as offload_mod
from .config import Recipe
from .device import allow_tf32
from .distributed import World, parallel_mode, shard_batch
from .errors import ConfigError, TrainingInterrupted, TrainingStopped
from .loss import CausalLMLoss, label_positions
from .memory_timeline import MARK
from .model import load_base
from .stop_signals import StopFlag
from .optim import LossScaler, MasterWeightOptimizer, ParamGroup, build_optimizer, lr_factor

if TYPE_CHECKING:  # annotations only: importing either costs seconds, and prepare() imports accelerate anyway
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


@dataclass
class Prepared:
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    loss_fn: torch.nn.Module  # CausalLMLoss, possibly wrapped by accelerate
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


def lora_spec(recipe: Recipe) -> lora.LoraSpec:
    from .quant import DTYPES

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
        from .loftq import Initializer
        from .quant import QuantSpec

        init = Initializer(recipe.lora.targets, QuantSpec.from_config(recipe.quant), recipe.lora.r,
                           lora_spec(recipe).scaling, recipe.lora.loftq_iters, loftq_offsets)
    device, sharder = accelerator.device, fsdp.LoadSharder(world, accelerator.device)
    model, tokenizer, _ = load_base(recipe.model, recipe.quant, device, sharder if mode == "fsdp" else None,
                                    before_quantize=init)
    if t.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs, no `enable_input_require_grads` hack, RNG (dropout) replayed.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    offload = offload_mod.OffloadStore(accelerator.device) if t.offload_activations else None
    if offload is not None:  # every checkpointed decoder layer's input goes to host memory between passes
        offload_mod.enable(model, offload)
    tiled_mlp.tile_mlps(model, t.mlp_chunk)
    _check_rank(model, recipe)
    try:
        adapted = methods.inject(model, recipe, lora_spec(recipe).dtype)
    except ValueError as e:
        hint = "" if str(e).startswith("ia3") else "; set lora.targets to some of them, or all-linear"
        raise ConfigError(f"{e}{hint}.") from None
    targets = sorted({m for mods in adapted.values() for m in mods})
    if init is not None:
        init.apply(model)  # A and B from LoftQ (nothing on resume: the checkpoint brings them)
    model.train()
    dataset = data.build(recipe.data, tokenizer, t.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if t.optimizer != "adamw":
        _probe_bnb_optimizer(t, accelerator.device)
    optimizer = build_optimizer(param_groups(named, recipe.lora.plus_ratio), t)
    if model.get_input_embeddings().weight.dtype == torch.float16:  # model.dtype fp16, or auto without bf16
        optimizer.scaler = LossScaler()
    from .quant import DTYPES

    if allow_tf32(accelerator.device, DTYPES[recipe.quant.compute_dtype]):
        print("quant.compute_dtype fp32 on CUDA: matmuls use TF32 tensor cores "
              "(torch.set_float32_matmul_precision('high')); pure fp32 would be ~10x slower.", file=sys.stderr)
    report, loss_fn = lora.param_report(model), CausalLMLoss(model, t.loss_chunk)
    if mode == "fsdp":
        sharder.shard_root(loss_fn, model)
    elif mode == "single":
        loss_fn = accelerator.prepare(loss_fn)
    # ddp/fsdp: no DDP wrapper; train_step sums the adapters' gradients once per step (distributed.py)
    if world.distributed:  # dropout differs per rank from here on (the adapters were initialised identically)
        torch.manual_seed((t.seed + 1_000_003 * world.rank) % 2**63)
        random.seed(t.seed + 1_000_003 * world.rank)
    return Prepared(accelerator, model, tokenizer, loss_fn, optimizer, dataset, targets, report, recipe, world, mode,
                    sharder.load_peak, init, adapted, methods.param_counts(model), offload)


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
    from .quant import bnb_optimizer

    try:
        w = torch.zeros(PROBE_SHAPE, device=device, requires_grad=True)
        w.grad = torch.ones_like(w)
        bnb_optimizer(t.optimizer, [w], 1e-3, 0.0).step()
    except Exception as e:  # any failure of the probe means "not on this machine"; the message carries the cause
        raise ConfigError(f"train.optimizer={t.optimizer}: bitsandbytes cannot run it on {device.type} here "
                          f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}). Use "
                          "train.optimizer=adamw, or install a bitsandbytes build that supports this machine.") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class StepResult:
    loss: float
    tokens: int  # tokens processed (non-pad), over all micro-batches
    grad_norm: float
    finite: bool
    stop: bool = False  # some rank was asked to stop (SIGINT/SIGTERM) during this step


def label_tokens(batch: dict) -> int:
    """Label tokens of a (CPU) batch: the positions CausalLMLoss averages over (position t predicts token t+1)."""
    return int((batch["labels"][:, 1:] != data.IGNORE).sum())


def host_batch_facts(batch: dict) -> tuple[torch.Tensor, int]:
    """Computed on the CPU batch BEFORE it moves to the device, so none of it synchronises a GPU:
    (label positions (N,) int64 into the flattened (B*T) sequence, see CausalLMLoss; non-pad tokens)."""
    return label_positions(batch["labels"]), int(batch["attention_mask"].sum())


HOST_BATCH_FUNCS = ("label_tokens", "host_batch_facts", "label_positions")  # CPU-batch only: not device syncs


def train_step(p: Prepared, micro_batches: list[dict], lr: float, max_grad_norm: float,
               stop: bool = False) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation). A non-finite loss or gradient norm is not
    applied: the gradients are dropped and `finite` is False (the caller stops or skips).

    The step's loss is the mean over every label token of every micro-batch, not the mean of per-batch means:
    micro-batch i contributes mean_i * n_i / N (N = the step's label tokens, counted on the CPU batches before any
    forward, so no host sync). `grad_accum: k` x `batch_size: b` is then the same step as `batch_size: k*b`
    over the same examples (transformers #34191 was this bug).

    Host syncs (issue 16): token counts and label positions come from the CPU batches; the loss is summed on the
    device; micro-batch gradients are summed in the optimizer's flat fp32 buffer by a hook; the loss and the
    gradient norm come back together in ONE transfer per step, which decides finiteness and clipping.

    Several ranks (distributed.py): `micro_batches` are this rank's shares; N counts the label tokens of every
    rank's shares (one small all-reduce before the first backward), and the flat fp32 gradients, the loss, the
    token count and the stop flag are summed across ranks after the last micro-batch: the SUM over ranks of
    mean_i * n_i / N is the mean over all label tokens of the global step, as in one process."""
    device, world = p.accelerator.device, p.world
    scaler = p.optimizer.scaler  # fp16 residual stream only; bf16 and fp32 run unscaled (scale 1, no extra kernel)
    scale = scaler.scale if scaler is not None else 1.0
    facts = [host_batch_facts(b) for b in micro_batches]
    total_tokens = sum(pos.numel() for pos, _ in facts)
    if world.distributed:
        n = torch.tensor([float(total_tokens)], device=device)
        world.all_reduce_([n])
        total_tokens = int(n.item())
    total_tokens = max(total_tokens, 1)
    total_loss = torch.zeros((), dtype=torch.float32, device=device)  # accumulated on device
    tokens = 0
    for batch, (pos, non_pad) in zip(micro_batches, facts):
        tokens += non_pad
        n = pos.numel()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss, _ = p.loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"],
                            positions=pos.to(device, non_blocking=True),
                            position_ids=batch.get("position_ids"))  # mean over its n tokens (packed: per document)
        weighted = loss * (n / total_tokens)
        p.accelerator.backward(weighted * scale if scaler is not None else weighted)
        total_loss += weighted.detach()
    # A named range: profiler traces (and memory_measure's timeline) see where the optimizer phase starts.
    with torch.profiler.record_function(MARK + "optimizer"):
        grads = p.optimizer.grads_to_masters()
        # non_blocking from the CPU: a blocking host-to-device copy would synchronise the stream
        counters = torch.tensor([float(tokens), float(stop)]).to(device, non_blocking=True)
        if world.distributed:  # the step's only other collective: gradients (in place), loss, tokens, stop flag
            extras = torch.cat([total_loss.reshape(1), counters])
            world.all_reduce_([*grads, extras])
            total_loss, counters = extras[0], extras[1:]
        step_loss, norm, tokens_f, stop_f = torch.cat(
            [torch.stack([total_loss, p.optimizer.grad_norm().to(device)]), counters]).tolist()  # the one host sync
        tokens, stop = int(tokens_f), stop_f > 0
        norm /= scale  # exact: a power of two
        finite = math.isfinite(step_loss) and math.isfinite(norm)
        if scaler is not None and math.isfinite(step_loss) and not finite:  # fp16 gradient overflow: skip, rescale
            scaler.update(overflow=True)
            p.optimizer.zero_grad()
            return StepResult(step_loss, tokens, norm, True)
        if finite:
            factor = 1.0 / scale
            if max_grad_norm > 0 and norm > max_grad_norm:
                factor *= max_grad_norm / (norm + 1e-6)
            if factor != 1.0:
                p.optimizer.scale_grads(factor)
            p.optimizer.set_lr(lr)
            p.optimizer.step()
            if scaler is not None:
                scaler.update(overflow=False)
        p.optimizer.zero_grad()
    return StepResult(step_loss, tokens, norm, finite, stop)


@torch.no_grad()
def evaluate(p: Prepared, examples: list[data.Example], batch_size: int) -> float:
    """Mean loss per label token over `examples` (eval mode: no dropout)."""
    p.model.eval()
    pad = data.pad_token_id(p.tokenizer)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(p.accelerator.device) for k, v in data.collate(examples[i : i + batch_size], pad).items()}
        loss, n = p.loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
        total, count = total + float(loss) * n, count + n
    p.model.train()
    return total / max(count, 1)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def restore(p: Prepared, stream: data.BatchStream, start_ckpt: Path | None) -> tuple[int, int]:
    """Every rank: continue from `start_ckpt` (adapter, optimizer, data position, this rank's RNG), or from step 0.
    Returns (step, skipped batches so far). Writes nothing (run_dir.open_run does, on rank 0)."""
    if start_ckpt is None:
        return 0, 0
    adapter, opt_state, state = checkpoint.load(start_ckpt)
    saved_world, world = int(state.get("world_size", 1)), p.world
    if saved_world != world.size:
        raise ConfigError(f"--resume: {start_ckpt} was written by a run of {saved_world} process(es), this launch has "
                          f"{world.size}. Resume with the same number of processes (torchrun --nproc_per_node "
                          f"{saved_world}, or one process for 1): each rank's data share and RNG continue exactly.")
    methods.load_state(p.model, adapter)
    p.optimizer.load_state_dict(opt_state)
    stream.load_state_dict(state["data"])
    rng = state["rng"]  # several processes: one state per rank
    checkpoint.set_rng_state(rng[world.rank] if isinstance(rng, list) else rng, p.accelerator.device)
    return state["step"], state["skipped"]


def log_step(p: Prepared, run_dir: Path, step: int, lr: float, res: StepResult, seconds: float,
             skipped: int, tracking: trackers.Trackers | None = None) -> tuple[dict, float | None]:
    """The metrics record of optimizer step `step` (1-based), with the validation loss when it is due; appended to
    metrics.jsonl every log_every steps, at the end, and with every validation loss (and then sent to the
    train.report_to trackers too). Returns (record, val loss)."""
    from .run_dir import write_metrics_line

    t = p.recipe.train
    record = {"step": step, "loss": round(res.loss, 6), "lr": lr, "grad_norm": round(res.grad_norm, 6),
              "tokens_per_s": round(res.tokens / seconds, 1),
              "peak_memory_bytes": peak_memory_bytes(p.accelerator.device), "skipped": skipped}
    val_loss = None
    if p.dataset.val and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
        val_loss = evaluate(p, p.dataset.val, t.batch_size)
        record["val_loss"] = round(val_loss, 6)
    if p.world.is_main and (step % t.log_every == 0 or step == t.steps or val_loss is not None):
        write_metrics_line(run_dir, record)
        if tracking is not None:
            tracking.log(record)  # what metrics.jsonl logs, at the same steps
    return record, val_loss


def finish(p: Prepared, run_dir: Path, again: str, step: int, skipped: int, last: dict | None,
           val_loss: float | None, tokens: int, elapsed: float) -> dict | None:
    """Write the final adapter (PEFT format) and summary.json; return the summary. Several processes: rank 0
    writes, with every rank's memory numbers in summary["ranks"]; the others return None."""
    ranks = p.world.all_gather_object({"rank": p.world.rank, "peak_memory_bytes": peak_memory_bytes(p.accelerator.device),
                                       "frozen_bytes": fsdp.local_frozen_bytes(p.model),
                                       "load_peak_bytes": p.load_peak_bytes})
    if not p.world.is_main:
        return None
    try:
        adapter_dir = methods.save(run_dir / "adapter", p.model, p.recipe)[0]  # one PEFT folder per method
    except (OSError, SafetensorError) as e:  # a full disk: the final checkpoint already holds every weight
        raise TrainingStopped(f"could not write {run_dir / 'adapter'} ({e}); the trained weights are safe in "
                              f"{checkpoint.latest(run_dir)}. Free disk space, then run: {again}") from None
    summary = {"steps": step, "final_loss": last["loss"] if last else None, "val_loss": val_loss,
               "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
               "peak_memory_bytes": peak_memory_bytes(p.accelerator.device), "trainable_params": p.report.trainable,
               "total_params": p.report.total, "trainable_percent": round(p.report.percent, 4),
               "trainable_by_method": p.counts, "skipped_batches": skipped, "adapter": str(adapter_dir), "wall_s": round(elapsed, 1)}
    if p.world.distributed:
        summary |= {"world_size": p.world.size, "parallel": p.parallel, "ranks": ranks}
    atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def run(recipe: Recipe, run_dir: str | Path, resume: bool = False, progress: bool = True,
        resume_command: str | None = None, world: World | None = None) -> dict | None:
    """`qlora-kit train`: returns a summary (steps, final loss, val loss, tokens/s, peak memory, params).
    `resume_command`: the exact command that continues this run, for the messages of a stopped run.
    `world`: this process's rank among several (distributed.detect()); rank 0 alone writes `run_dir`, and the
    other ranks return None."""
    from tqdm.auto import tqdm

    from . import distributed
    from .run_dir import check_run_dir, open_run

    world = world or World()
    run_dir = Path(run_dir)
    again = resume_command or f"qlora-kit train RECIPE --out {run_dir} --resume"
    t = recipe.train
    distributed.use_timeout(world, t.dist_timeout_s)

    def setup():  # every rank checks and loads; any rank's bad input stops all of them (distributed.agree)
        start_ckpt = check_run_dir(run_dir, recipe, resume)
        stored = None
        if start_ckpt is not None and recipe.lora.init == "loftq":  # the base must be quantized as when it started
            from .loftq import load as load_offsets

            stored = load_offsets(run_dir)
        p = prepare(recipe, world, stored)
        stream = data.BatchStream(p.dataset.train, t.batch_size * world.size, t.seed, data.pad_token_id(p.tokenizer))
        return p, stream, start_ckpt, *restore(p, stream, start_ckpt)

    p, stream, start_ckpt, step, skipped = world.agree(setup)
    if world.is_main:
        open_run(run_dir, p.recipe, start_ckpt, resume, step)
        if p.loftq is not None and p.loftq.stored is None:
            from .loftq import save as save_offsets

            save_offsets(run_dir, p.loftq.offsets)  # export, generate and eval rebuild the base from these
            print(f"LoftQ init ({recipe.lora.loftq_iters} iterations, {len(p.loftq.offsets)} modules): "
                  f"{p.loftq.seconds:.1f} s extra load time", file=sys.stderr)
        ranks = f"; {world.size} processes ({p.parallel})" if world.distributed else ""
        what = "; ".join(f"{k}{f' r={recipe.lora.r}' if k != 'ia3' else ''} on {len(v)} modules"
                         for k, v in p.methods.items())
        print(f"{p.report} — {what} ({methods.describe_counts(p.counts)}); "
              f"{len(p.dataset.train)} train / {len(p.dataset.val)} val examples{ranks}", file=sys.stderr)

    def save_ckpt() -> Path | None:
        rngs = world.all_gather_object(checkpoint.rng_state(p.accelerator.device)) if world.distributed else None
        extra = {"data": stream.state_dict(), "skipped": skipped, "recipe": recipe.to_dict(), "world_size": world.size}
        return world.agree(lambda: checkpoint.save(  # a failed write stops every rank; rank 0 says why
            run_dir, step, methods.state_dict(p.model), p.optimizer.state_dict(), extra, t.keep_checkpoints,
            p.accelerator.device, rng=rngs) if world.is_main else None)

    bar = tqdm(total=t.steps, initial=step, disable=not (progress and world.is_main), desc="train", unit="step",
               dynamic_ncols=True)
    val_loss, last, t0, tokens_total = None, None, time.perf_counter(), 0
    with StopFlag(announce=world.is_main) as stop, \
            trackers.reporting(t.report_to if world.is_main else [], run_dir, recipe.to_dict()) as tracking:
        while step < t.steps:
            ts = time.perf_counter()
            lr = t.lr * lr_factor(step, t)  # once per step: the optimizer and the log see the same value
            micro = [shard_batch(stream.next_batch(), world) for _ in range(t.grad_accum)]
            with world.guarded("a training step"):  # FSDP's gathers fail here when a peer dies
                res = train_step(p, micro, lr, t.max_grad_norm, stop=stop.signal is not None)
            if not res.finite:
                if t.on_nonfinite != "skip":
                    good = checkpoint.latest(run_dir)
                    raise world.quiet_unless_main(TrainingStopped(
                        f"non-finite loss or gradient at step {step + 1} (loss {res.loss}, grad norm {res.grad_norm}). "
                        f"Last good checkpoint: {good or 'none'}. Lower train.lr (--set train.lr=...) or skip such "
                        f"batches (--set train.on_nonfinite=skip), and continue from that checkpoint with: {again}"))
                skipped += 1
            step += 1
            tokens_total += res.tokens
            last, val = log_step(p, run_dir, step, lr, res, time.perf_counter() - ts, skipped, tracking)
            val_loss = val if val is not None else val_loss
            bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                            mem=f"{last['peak_memory_bytes'] / 2**30:.2f}GiB")
            bar.update(1)
            if (t.save_every and step % t.save_every == 0) or step == t.steps:
                save_ckpt()
            # one process: the flag itself; several: what the step's all-reduce made every rank agree on
            if (res.stop if world.distributed else stop.signal is not None) and step < t.steps:
                path = save_ckpt()
                bar.close()
                name = signal.Signals(stop.signal).name if stop.signal else "a signal to another rank"
                raise world.quiet_unless_main(TrainingInterrupted(
                    f"stopped by {name} at step {step}; checkpoint saved in {path}. Resume with: {again}"))
    bar.close()
    return world.agree(lambda: finish(p, run_dir, again, step, skipped, last, val_loss, tokens_total,
                                      time.perf_counter() - t0))
