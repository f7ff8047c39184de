"""The training loop, written out (no Trainer, no callbacks): load -> inject -> data -> steps -> adapter.

`prepare()` (prepare.py) builds everything a step needs; `train_step()` is the one step function, reused by bench/;
`run()` is `qlora-kit train`: the loop with logging, validation, checkpoints, resume and clean stops.
Device placement goes through accelerate's Accelerator, so the same loop runs on the CPU and on one CUDA GPU (chosen
automatically). Several processes (torchrun / accelerate launch) share one run as distributed.py describes: a
disjoint share of every global batch per rank, one sum of the adapter gradients per step, rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .. import atomic
from . import fsdp, preference, reference, trackers
from ..data import pipeline as data, preference as data_preference
from ..adapters import methods
from ..run import checkpoint
from ..run.lock import RunLock
from ..config import Recipe
from .distributed import World, shard_batch
from ..errors import ConfigError, TrainingInterrupted, TrainingStopped
from ..terms import PROFILER_MARK
from .loss import label_positions
from .prepare import Prepared, prepare  # noqa: F401  (train.prepare stays the public entry)
from .stop_signals import StopFlag
from .optim import lr_factor



@dataclass
class StepResult:
    loss: float
    tokens: int  # tokens processed (non-pad), over all micro-batches
    grad_norm: float
    finite: bool
    stop: bool = False  # some rank was asked to stop (SIGINT/SIGTERM) during this step
    stats: dict[str, float] | None = None  # preference objectives: rewards, margin, accuracy (preference.summarize)


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

    Host syncs, one per step: token counts and label positions come from the CPU batches; the loss is summed on the
    device; micro-batch gradients are summed in the optimizer's flat fp32 buffer by a hook; the loss and the
    gradient norm come back together in ONE transfer per step, which decides finiteness and clipping.

    Several ranks (distributed.py): `micro_batches` are this rank's shares; N counts the label tokens of every
    rank's shares (one small all-reduce before the first backward), and the flat fp32 gradients, the loss, the
    token count and the stop flag are summed across ranks after the last micro-batch: the SUM over ranks of
    mean_i * n_i / N is the mean over all label tokens of the global step, as in one process. kto first runs its
    no-grad pre-pass (preference.step_z0): z0 over every rank's mismatched pairs, one more small all-reduce."""
    device, world = p.accelerator.device, p.world
    scaler = p.optimizer.scaler  # fp16 residual stream only; bf16 and fp32 run unscaled (scale 1, no extra kernel)
    scale = scaler.scale if scaler is not None else 1.0
    facts = [host_batch_facts(b) for b in micro_batches]
    # What the step's loss is a mean over: label tokens (sft), or units (preference: pairs, kto's answers), 2 rows each
    pref = p.recipe.train.objective != "sft"
    weights = [b["input_ids"].shape[0] // 2 if pref else pos.numel() for b, (pos, _) in zip(micro_batches, facts)]
    sums = torch.zeros(preference.N_SUMS if pref else 0, dtype=torch.float32, device=device)
    total_tokens = sum(weights)
    if world.distributed:
        n = torch.tensor([float(total_tokens)], device=device)
        world.all_reduce_([n])
        total_tokens = int(n.item())
    total_tokens = max(total_tokens, 1)
    total_loss = torch.zeros((), dtype=torch.float32, device=device)  # accumulated on device
    tokens = 0
    # kto: z0 is the mean over every mismatched pair of the step (every micro-batch, every rank), not per batch
    z0 = preference.step_z0(p.loss_fn, micro_batches, device, world.all_reduce_ if world.distributed else None) \
        if p.recipe.train.objective == "kto" else None
    for batch, (pos, non_pad), n in zip(micro_batches, facts, weights):
        tokens += non_pad
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if pref:  # mean over its n units; the rewards' sums ride along in the step's one transfer
            loss, part = p.loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["desirable"],
                                   positions=pos.to(device, non_blocking=True), example=batch.get("example"), z0=z0)
            sums += part.detach()
        else:
            loss, _ = p.loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                positions=pos.to(device, non_blocking=True),
                                position_ids=batch.get("position_ids"))  # mean over its n tokens (packed: per doc)
        weighted = loss * (n / total_tokens)
        p.accelerator.backward(weighted * scale if scaler is not None else weighted)
        total_loss += weighted.detach()
    # A named range: profiler traces (and memory_measure's timeline) see where the optimizer phase starts.
    with torch.profiler.record_function(PROFILER_MARK + "optimizer"):
        grads = p.optimizer.grads_to_masters()
        # non_blocking from the CPU: a blocking host-to-device copy would synchronise the stream
        counters = torch.cat([torch.tensor([float(tokens), float(stop)]).to(device, non_blocking=True), sums])
        if world.distributed:  # the step's only other collective: gradients (in place), loss, tokens, stop flag
            extras = torch.cat([total_loss.reshape(1), counters])
            world.all_reduce_([*grads, extras])
            total_loss, counters = extras[0], extras[1:]
        step_loss, norm, tokens_f, stop_f, *sums_f = torch.cat(
            [torch.stack([total_loss, p.optimizer.grad_norm().to(device)]), counters]).tolist()  # the one host sync
        tokens, stop = int(tokens_f), stop_f > 0
        stats = preference.summarize(sums_f) if pref else None
        norm /= scale  # exact: a power of two
        finite = math.isfinite(step_loss) and math.isfinite(norm)
        if scaler is not None and math.isfinite(step_loss) and not finite:  # fp16 gradient overflow: skip, rescale
            scaler.update(overflow=True)
            p.optimizer.zero_grad()
            return StepResult(step_loss, tokens, norm, True, stats=stats)
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
    return StepResult(step_loss, tokens, norm, finite, stop, stats)


@torch.no_grad()
def evaluate(p: Prepared, examples: list[data.Example], batch_size: int) -> float:
    """Mean loss per label token over `examples` (eval mode: no dropout); preference: per unit (evaluate_units)."""
    if p.recipe.train.objective != "sft":
        return evaluate_units(p, examples, batch_size)["loss"]
    p.model.eval()
    pad = data.pad_token_id(p.tokenizer)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(p.accelerator.device) for k, v in data.collate(examples[i : i + batch_size], pad).items()}
        loss, n = p.loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
        total, count = total + float(loss) * n, count + n
    p.model.train()
    return total / max(count, 1)


def evaluate_units(p: Prepared, units: data.Units, batch_size: int) -> dict[str, float]:
    """Preference validation: the objective's mean loss over `units`, rewards, margin, accuracy."""
    loss_fn = getattr(p.loss_fn, "module", p.loss_fn)  # under accelerate's wrapper, the module itself
    return preference.evaluate(loss_fn, units, batch_size, data.pad_token_id(p.tokenizer), p.accelerator.device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def restore(p: Prepared, stream: data.BatchStream, start_ckpt: Path | None) -> tuple[Path | None, int, int, dict]:
    """Every rank: continue from `start_ckpt` (adapter, optimizer, data position, this rank's RNG), or from step 0;
    when it is damaged, from the newest older checkpoint that reads. Returns (the checkpoint used, step, skipped
    batches so far, the run so far: tokens, wall_s, peak_memory_bytes, from_step: what summary.json adds this part
    to). Writes nothing (run_dir.open_run does, on rank 0)."""
    if start_ckpt is None:
        return None, 0, 0, {"tokens": 0, "wall_s": 0.0, "peak_memory_bytes": 0, "from_step": 0}
    start_ckpt, (adapter, opt_state, state) = checkpoint.load_newest_readable(start_ckpt, announce=p.world.is_main)
    done, steps = int(state.get("step", 0)), p.recipe.train.steps
    if done > steps:
        raise ConfigError(f"--resume: {start_ckpt} is at step {done}, past train.steps {steps}; nothing is left to "
                          f"run. To train on, raise it: --set train.steps=N with N > {done}.")
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
    so_far = state.get("so_far") or {"tokens": 0, "wall_s": 0.0, "peak_memory_bytes": 0, "from_step": state["step"]}
    return start_ckpt, state["step"], state["skipped"], so_far  # without so_far: the summary covers this part


def log_step(p: Prepared, run_dir: Path, step: int, lr: float, res: StepResult, seconds: float,
             skipped: int, tracking: trackers.Trackers | None = None) -> tuple[dict, float | None]:
    """The metrics record of optimizer step `step` (1-based), with the validation loss when it is due; appended to
    metrics.jsonl every log_every steps, at the end, and with every validation loss (and then sent to the
    train.report_to trackers too). Returns (record, val loss)."""
    from ..run.folder import write_metrics_line

    t = p.recipe.train
    record = {"step": step, "loss": round(res.loss, 6), "lr": lr, "grad_norm": round(res.grad_norm, 6),
              "tokens_per_s": round(res.tokens / seconds, 1),
              "peak_memory_bytes": peak_memory_bytes(p.accelerator.device), "skipped": skipped}
    record |= {k: round(v, 6) for k, v in (res.stats or {}).items()}
    val_loss = None
    if p.dataset.val and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
        if t.objective != "sft":
            val = evaluate_units(p, p.dataset.val, t.batch_size)
            val_loss = val.pop("loss")
            record |= {f"val_{k}": round(v, 6) for k, v in val.items()}
        else:
            val_loss = evaluate(p, p.dataset.val, t.batch_size)
        record["val_loss"] = round(val_loss, 6)
    if p.world.is_main and (step % t.log_every == 0 or step == t.steps or val_loss is not None):
        write_metrics_line(run_dir, record)
        if tracking is not None:
            tracking.log(record)  # what metrics.jsonl logs, at the same steps
    return record, val_loss


def finish(p: Prepared, run_dir: Path, again: str, step: int, skipped: int, last: dict | None,
           val_loss: float | None, tokens: int, elapsed: float, so_far: dict | None = None) -> dict | None:
    """Write the final adapter (PEFT format) and summary.json; return the summary. Several processes: rank 0
    writes, with every rank's memory numbers in summary["ranks"]; the others return None. `tokens` and `elapsed`
    cover the whole run (resumed parts included); `so_far`: restore's record of the parts before this one."""
    so_far = so_far or {"peak_memory_bytes": 0, "from_step": 0}
    ranks = p.world.all_gather_object({"rank": p.world.rank,
                                       "peak_memory_bytes": peak_memory_bytes(p.accelerator.device),
                                       "frozen_bytes": fsdp.local_frozen_bytes(p.model),
                                       "load_peak_bytes": p.load_peak_bytes})
    if not p.world.is_main:
        return None
    target = run_dir / "adapter"
    try:  # atomically, replacing what is there: a link named adapter/ is replaced, never written through
        with atomic.atomic_folder(target, replace=True) as tmp:
            written = methods.save(tmp, p.model, p.recipe)  # one PEFT folder per method
        adapter_dir = target / written[0].relative_to(tmp)
    except (OSError, SafetensorError) as e:  # a full disk: the final checkpoint already holds every weight
        raise TrainingStopped(f"could not write {run_dir / 'adapter'} ({e}); the trained weights are safe in "
                              f"{checkpoint.latest(run_dir)}. Free disk space, then run: {again}") from None
    summary = {"steps": step, "final_loss": last["loss"] if last else None, "val_loss": val_loss,
               "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
               "peak_memory_bytes": max(peak_memory_bytes(p.accelerator.device), so_far["peak_memory_bytes"]),
               "trainable_params": p.report.trainable,
               "total_params": p.report.total, "trainable_percent": round(p.report.percent, 4),
               "trainable_by_method": p.counts, "skipped_batches": skipped, "adapter": str(adapter_dir),
               "wall_s": round(elapsed, 1), "tokens": tokens}
    if p.base_stored:  # the base as stored (its experts MXFP4), before quant.type quantized it
        summary["base_stored"] = p.base_stored
    if so_far["from_step"]:  # resumed from a checkpoint that predates this record: the totals start there
        summary["totals_from_step"] = so_far["from_step"]
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
    from . import distributed

    world = world or World()
    run_dir = Path(run_dir)
    distributed.use_timeout(world, recipe.train.dist_timeout_s)
    # rank 0 holds the folder's lock for the whole run (the other ranks are its own launch); released on every exit
    lock = RunLock(run_dir)
    world.agree(lambda: lock.acquire() if world.is_main else None)
    try:
        return _run_locked(recipe, run_dir, resume, progress, resume_command, world)
    finally:
        lock.release()


def _run_locked(recipe: Recipe, run_dir: Path, resume: bool, progress: bool, resume_command: str | None,
                world: World) -> dict | None:
    from tqdm.auto import tqdm

    from ..run.folder import check_run_dir, open_run

    again = resume_command or f"qlora-kit train RECIPE --out {run_dir} --resume"
    t = recipe.train

    def setup():  # every rank checks and loads; any rank's bad input stops all of them (distributed.agree)
        start_ckpt = check_run_dir(run_dir, recipe, resume)
        stored = None
        if start_ckpt is not None and recipe.lora.init == "loftq":  # the base must be quantized as when it started
            from ..adapters.loftq import load as load_offsets

            stored = load_offsets(run_dir)
        p = prepare(recipe, world, stored)
        collate = data.collate if t.objective == "sft" else data_preference.collate
        stream = data.BatchStream(p.dataset.train, t.batch_size * world.size, t.seed, data.pad_token_id(p.tokenizer),
                                  collate)
        return p, stream, *restore(p, stream, start_ckpt)

    p, stream, start_ckpt, step, skipped, so_far = world.agree(setup)
    if world.is_main:
        open_run(run_dir, p.recipe, start_ckpt, resume, step)
        if p.loftq is not None and p.loftq.stored is None:
            from ..adapters.loftq import save as save_offsets

            save_offsets(run_dir, p.loftq.offsets)  # export, generate and eval rebuild the base from these
            print(f"LoftQ init ({recipe.lora.loftq_iters} iterations, {len(p.loftq.offsets)} modules): "
                  f"{p.loftq.seconds:.1f} s extra load time", file=sys.stderr)
        ranks = f"; {world.size} processes ({p.parallel})" if world.distributed else ""
        units = {"sft": "examples", "kto": "answers"}.get(t.objective, "pairs")
        what = "; ".join(f"{k}{f' r={recipe.lora.r}' if k != 'ia3' else ''} on {len(v)} modules"
                         for k, v in p.methods.items())
        train = (f"{len(p.dataset.train)} packed train rows ({len(p.dataset.train.index)} {units})"
                 if getattr(p.dataset.train, "packed", False) else f"{len(p.dataset.train)} train")  # pairs: Units
        print(f"{p.report} — {what} ({methods.describe_counts(p.counts)}); "
              f"{train} / {len(p.dataset.val)} val {units}{ranks}", file=sys.stderr)
        if t.warmup_steps >= t.steps and step == 0:
            print(f"warning: train.warmup_steps={t.warmup_steps} is not shorter than train.steps={t.steps}: the "
                  f"learning rate never reaches train.lr={t.lr:g} (it ends at {t.lr * lr_factor(t.steps - 1, t):.3g})."
                  f" Lower train.warmup_steps (e.g. --set train.warmup_steps={max(0, t.steps // 10)}).",
                  file=sys.stderr)

    if t.precompute_reference:  # after open_run: the run folder is ours; a resume finds the stored values
        world.agree(lambda: reference.attach(p, run_dir))

    def save_ckpt() -> Path | None:
        rngs = world.all_gather_object(checkpoint.rng_state(p.accelerator.device)) if world.distributed else None
        extra = {"data": stream.state_dict(), "skipped": skipped, "recipe": recipe.to_dict(), "world_size": world.size,
                 "so_far": {"tokens": tokens_total, "wall_s": so_far["wall_s"] + time.perf_counter() - t0,
                            "peak_memory_bytes": max(so_far["peak_memory_bytes"],
                                                     peak_memory_bytes(p.accelerator.device)),
                            "from_step": so_far["from_step"]}}
        return world.agree(lambda: checkpoint.save(  # a failed write stops every rank; rank 0 says why
            run_dir, step, methods.state_dict(p.model), p.optimizer.state_dict(), extra, t.keep_checkpoints,
            p.accelerator.device, rng=rngs) if world.is_main else None)

    bar = tqdm(total=t.steps, initial=step, disable=not (progress and world.is_main), desc="train", unit="step",
               dynamic_ncols=True)
    val_loss, last, t0, tokens_total = None, None, time.perf_counter(), so_far["tokens"]
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
                    where = (f"Last good checkpoint: {good}; continue from it" if good is not None else
                             "No checkpoint was written yet; start over from step 0 in the same folder")
                    raise world.quiet_unless_main(TrainingStopped(
                        f"non-finite loss or gradient at step {step + 1} (loss {res.loss}, grad norm {res.grad_norm}). "
                        f"Lower train.lr (--set train.lr=...) or skip such batches (--set train.on_nonfinite=skip). "
                        f"{where} with: {again}"))
                skipped += 1
            step += 1
            tokens_total += res.tokens
            last, val = log_step(p, run_dir, step, lr, res, time.perf_counter() - ts, skipped, tracking)
            val_loss = val if val is not None else val_loss
            shown = {"acc": res.stats.get("reward_accuracy"), "margin": res.stats["reward_margin"]} if res.stats else {}
            shown = {k: f"{v:.3f}" for k, v in shown.items() if v is not None}
            if val_loss is not None:  # the latest, once measured
                shown["val_loss"] = f"{val_loss:.3f}"
            bar.set_postfix(loss=f"{res.loss:.3f}", **shown, tok_s=f"{last['tokens_per_s']:.0f}",
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
                                      so_far["wall_s"] + time.perf_counter() - t0, so_far))
