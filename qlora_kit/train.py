"""The training loop, written out (no Trainer, no callbacks): load -> inject -> data -> steps -> adapter.

`prepare()` builds everything a step needs; `train_step()` is the one step function, reused by bench/;
`run()` is `qlora-kit train`: the loop with logging, validation, checkpoints, resume and clean stops.
Device placement goes through accelerate's Accelerator, so the same loop runs on the CPU, on one CUDA GPU (chosen
automatically) and under `accelerate launch`.
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from . import atomic, checkpoint, data, lora, peft_format
from .config import Recipe, dump_recipe
from .device import allow_tf32
from .errors import ConfigError, TrainingInterrupted, TrainingStopped
from .loss import CausalLMLoss, label_positions
from .memory_timeline import MARK
from .model import load_base
from .optim import LossScaler, MasterWeightOptimizer, build_optimizer, lr_factor

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


def lora_spec(recipe: Recipe) -> lora.LoraSpec:
    from .quant import DTYPES

    c = recipe.lora
    return lora.LoraSpec(c.r, c.alpha, c.dropout, c.init, c.rslora, DTYPES[recipe.quant.compute_dtype])


def prepare(recipe: Recipe) -> Prepared:
    from accelerate import Accelerator

    t = recipe.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA GPU is visible; use train.device=auto or cpu.")
    if t.optimizer.startswith("paged") and not torch.cuda.is_available():
        raise ConfigError(f"train.optimizer={t.optimizer} pages optimizer state through CUDA unified memory, "
                          "which needs a CUDA GPU; use adamw or adamw8bit on the CPU.")
    data.check(recipe.data)  # a bad line fails now, not after a long model load
    accelerator = Accelerator(cpu=t.device == "cpu", mixed_precision="no")  # dtypes are ours: bf16 compute
    seed_everything(t.seed)
    model, tokenizer, _ = load_base(recipe.model, recipe.quant, accelerator.device)
    if t.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs, no `enable_input_require_grads` hack, RNG (dropout) replayed.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _check_rank(model, recipe)
    try:
        targets = lora.inject(model, recipe.lora.targets, lora_spec(recipe))
    except ValueError as e:
        raise ConfigError(str(e) + "; set lora.targets to some of them, or all-linear.") from None
    model.train()
    dataset = data.build(recipe.data, tokenizer, t.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer != "adamw":
        _probe_bnb_optimizer(t, accelerator.device)
    optimizer = build_optimizer(params, t)
    if model.get_input_embeddings().weight.dtype == torch.float16:  # model.dtype fp16, or auto without bf16
        optimizer.scaler = LossScaler()
    from .quant import DTYPES

    if allow_tf32(accelerator.device, DTYPES[recipe.quant.compute_dtype]):
        print("quant.compute_dtype fp32 on CUDA: matmuls use TF32 tensor cores "
              "(torch.set_float32_matmul_precision('high')); pure fp32 would be ~10x slower.", file=sys.stderr)
    loss_fn = accelerator.prepare(CausalLMLoss(model, t.loss_chunk))
    return Prepared(accelerator, model, tokenizer, loss_fn, optimizer, dataset, targets, lora.param_report(model),
                    recipe)


def _check_rank(model: torch.nn.Module, recipe: Recipe) -> None:
    """An adapter's rank cannot exceed min(in, out) of its layer; a larger r only wastes memory, and an absurd one
    (a typo, r: 16000000) would try to allocate terabytes before any other check could speak."""
    chosen = lora.match_targets(lora.linear_names(model), recipe.lora.targets)
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


def label_tokens(batch: dict) -> int:
    """Label tokens of a (CPU) batch: the positions CausalLMLoss averages over (position t predicts token t+1)."""
    return int((batch["labels"][:, 1:] != data.IGNORE).sum())


def host_batch_facts(batch: dict) -> tuple[torch.Tensor, int]:
    """Computed on the CPU batch BEFORE it moves to the device, so none of it synchronises a GPU:
    (label positions (N,) int64 into the flattened (B*T) sequence, see CausalLMLoss; non-pad tokens)."""
    return label_positions(batch["labels"]), int(batch["attention_mask"].sum())


HOST_BATCH_FUNCS = ("label_tokens", "host_batch_facts", "label_positions")  # CPU-batch only: not device syncs


def train_step(p: Prepared, micro_batches: list[dict], lr: float, max_grad_norm: float) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation). A non-finite loss or gradient norm is not
    applied: the gradients are dropped and `finite` is False (the caller stops or skips).

    The step's loss is the mean over every label token of every micro-batch, not the mean of per-batch means:
    micro-batch i contributes mean_i * n_i / N (N = the step's label tokens, counted on the CPU batches before any
    forward, so no host sync). `grad_accum: k` x `batch_size: b` is then the same step as `batch_size: k*b`
    over the same examples (transformers #34191 was this bug).

    Host syncs (issue 16): token counts and label positions come from the CPU batches; the loss is summed on the
    device; micro-batch gradients are summed in the optimizer's flat fp32 buffer by a hook; the loss and the
    gradient norm come back together in ONE transfer per step, which decides finiteness and clipping."""
    device = p.accelerator.device
    scaler = p.optimizer.scaler  # fp16 residual stream only; bf16 and fp32 run unscaled (scale 1, no extra kernel)
    scale = scaler.scale if scaler is not None else 1.0
    facts = [host_batch_facts(b) for b in micro_batches]
    total_tokens = max(sum(pos.numel() for pos, _ in facts), 1)
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
        p.optimizer.grads_to_masters()
        step_loss, norm = torch.stack([total_loss, p.optimizer.grad_norm().to(device)]).tolist()  # the one host sync
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
    return StepResult(step_loss, tokens, norm, finite)


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


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current step. A second Ctrl-C aborts."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint...", file=sys.stderr)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def restore(p: Prepared, stream: data.BatchStream, recipe: Recipe, run_dir: Path, start_ckpt: Path | None,
            resume: bool) -> tuple[int, int]:
    """Continue from `start_ckpt` (adapter, optimizer, data position, RNG; metrics after it dropped), or start a
    fresh run (writing recipe.yaml). Returns (step, skipped batches so far)."""
    from .run_dir import truncate_metrics

    if start_ckpt is not None:
        adapter, opt_state, state = checkpoint.load(start_ckpt)
        lora.load_adapter_state(p.model, adapter)
        p.optimizer.load_state_dict(opt_state)
        stream.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"], p.accelerator.device)
        truncate_metrics(run_dir, state["step"])
        print(f"resuming from {start_ckpt} (step {state['step']} of {recipe.train.steps})", file=sys.stderr)
        return state["step"], state["skipped"]
    if resume:  # the run died before its first checkpoint: start over in the same folder
        truncate_metrics(run_dir, 0)
        print(f"{run_dir} has no complete checkpoint yet: starting from step 0", file=sys.stderr)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    return 0, 0


def log_step(p: Prepared, run_dir: Path, step: int, lr: float, res: StepResult, seconds: float,
             skipped: int) -> tuple[dict, float | None]:
    """The metrics record of optimizer step `step` (1-based), with the validation loss when it is due; appended to
    metrics.jsonl every log_every steps, at the end, and with every validation loss. Returns (record, val loss)."""
    from .run_dir import write_metrics_line

    t = p.recipe.train
    record = {"step": step, "loss": round(res.loss, 6), "lr": lr, "grad_norm": round(res.grad_norm, 6),
              "tokens_per_s": round(res.tokens / seconds, 1), "peak_memory_bytes": peak_memory_bytes(p.accelerator.device),
              "skipped": skipped}
    val_loss = None
    if p.dataset.val and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
        val_loss = evaluate(p, p.dataset.val, t.batch_size)
        record["val_loss"] = round(val_loss, 6)
    if step % t.log_every == 0 or step == t.steps or val_loss is not None:
        write_metrics_line(run_dir, record)
    return record, val_loss


def finish(p: Prepared, run_dir: Path, again: str, step: int, skipped: int, last: dict | None,
           val_loss: float | None, tokens: int, elapsed: float) -> dict:
    """Write the final adapter (PEFT format) and summary.json; return the summary."""
    c = p.recipe.lora
    try:
        adapter_dir = peft_format.save_adapter(
            run_dir / "adapter", lora.adapter_state_dict(p.model), r=c.r, alpha=c.alpha, dropout=c.dropout,
            rslora=c.rslora, base_model=p.recipe.model.path, init=c.init)
    except (OSError, SafetensorError) as e:  # a full disk: the final checkpoint already holds every weight
        raise TrainingStopped(f"could not write {run_dir / 'adapter'} ({e}); the trained weights are safe in "
                              f"{checkpoint.latest(run_dir)}. Free disk space, then run: {again}") from None
    summary = {"steps": step, "final_loss": last["loss"] if last else None, "val_loss": val_loss,
               "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
               "peak_memory_bytes": peak_memory_bytes(p.accelerator.device), "trainable_params": p.report.trainable,
               "total_params": p.report.total, "trainable_percent": round(p.report.percent, 4),
               "skipped_batches": skipped, "adapter": str(adapter_dir), "wall_s": round(elapsed, 1)}
    atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def run(recipe: Recipe, run_dir: str | Path, resume: bool = False, progress: bool = True,
        resume_command: str | None = None) -> dict:
    """`qlora-kit train`: returns a summary (steps, final loss, val loss, tokens/s, peak memory, params).
    `resume_command`: the exact command that continues this run, for the messages of a stopped run."""
    from tqdm.auto import tqdm

    from .run_dir import check_run_dir

    run_dir = Path(run_dir)
    again = resume_command or f"qlora-kit train RECIPE --out {run_dir} --resume"
    start_ckpt = check_run_dir(run_dir, recipe, resume)
    t = recipe.train
    p = prepare(recipe)
    stream = data.BatchStream(p.dataset.train, t.batch_size, t.seed, data.pad_token_id(p.tokenizer))
    step, skipped = restore(p, stream, recipe, run_dir, start_ckpt, resume)
    print(f"{p.report} — LoRA r={recipe.lora.r} on {len(p.targets)} modules; "
          f"{len(p.dataset.train)} train / {len(p.dataset.val)} val examples", file=sys.stderr)

    def save_ckpt() -> Path:
        extra = {"data": stream.state_dict(), "skipped": skipped, "recipe": recipe.to_dict()}
        return checkpoint.save(run_dir, step, lora.adapter_state_dict(p.model), p.optimizer.state_dict(), extra,
                               t.keep_checkpoints, p.accelerator.device)

    bar = tqdm(total=t.steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    val_loss, last, t0, tokens_total = None, None, time.perf_counter(), 0
    with _StopFlag() as stop:
        while step < t.steps:
            ts = time.perf_counter()
            lr = t.lr * lr_factor(step, t)  # once per step: the optimizer and the log see the same value
            res = train_step(p, [stream.next_batch() for _ in range(t.grad_accum)], lr, t.max_grad_norm)
            if not res.finite:
                if t.on_nonfinite != "skip":
                    good = checkpoint.latest(run_dir)
                    raise TrainingStopped(
                        f"non-finite loss or gradient at step {step + 1} (loss {res.loss}, grad norm {res.grad_norm}). "
                        f"Last good checkpoint: {good or 'none'}. Lower train.lr (--set train.lr=...) or skip such "
                        f"batches (--set train.on_nonfinite=skip), and continue from that checkpoint with: {again}")
                skipped += 1
            step += 1
            tokens_total += res.tokens
            last, val = log_step(p, run_dir, step, lr, res, time.perf_counter() - ts, skipped)
            val_loss = val if val is not None else val_loss
            bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                            mem=f"{last['peak_memory_bytes'] / 2**30:.2f}GiB")
            bar.update(1)
            if (t.save_every and step % t.save_every == 0) or step == t.steps:
                save_ckpt()
            if stop.signal is not None and step < t.steps:
                path = save_ckpt()
                bar.close()
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(stop.signal).name} at step {step}; checkpoint saved in {path}. "
                    f"Resume with: {again}")
    bar.close()
    return finish(p, run_dir, again, step, skipped, last, val_loss, tokens_total, time.perf_counter() - t0)
