"""Measured memory of QLoRA training steps, split into the components `memory_estimate` predicts.

One configuration per process (peaks are per process): `python -m qlora_kit.measure.breakdown --json --seq 256 ...`
prints one JSON object; `qlora-kit bench memory` runs a grid of them. The model is loaded with `train.prepare` and
stepped with `train.train_step`, the functions `qlora-kit train` uses; the batch is synthetic, B x S tokens, every
position labelled, so that the sequence length is exact (a preference objective: 2B rows, `preference_batch`; its
no-grad passes are the phase `reference_pass`, marked by train.preference).

What is measured, and how (sizes in bytes)
  static tensors: an inventory of the live model and optimizer, each storage counted once (tied weights once)
    quantized_weights   QuantLinear.qweight (quant none: the decoder Linears' 16-bit weights)
    quant_constants     the other QuantLinear tensors: absmax, nested absmax and code, codebook, offset
    unquantized_params  frozen parameters (embeddings, norms, lm_head, biases; every Linear with quant none) and
                        the other module buffers (rotary inv_freq)
    adapters            trainable parameters
    optimizer_state     fp32 masters of the bf16 adapters + the inner optimizer's state, after the first step
  transient tensors of one steady step (step >= 2): every allocation and free the torch allocator reports to the
  profiler (`profile_memory=True`), each tagged by where it was allocated:
    adapter_grads       the optimizer's flat fp32 gradient (optim.py; recognised by its address when a hook fills it)
    logits_and_loss     from the final norm to the cross-entropy and back (the loss head, forward and backward)
    activations         the decoder layers: checkpointed inputs, the recomputed layer's saved tensors, gradients
                        in flight, transiently dequantized weights, kernel workspaces
    optimizer_state     (transient part) after backward: the masters' fp32 gradients, the AdamW update's temporaries
  peak_bytes = static + the largest transient total of the step. On the CPU this is the analogue of CUDA's
  `max_memory_allocated`: the bytes held by live tensors at the worst moment, whatever the allocator caches.
  `at_peak` splits it by component at that moment; `component_peaks` gives each component's own maximum.
  This is the number the estimate is checked against: RSS also holds the interpreter, the libraries, tokenizer,
  the allocator's free-but-unreturned pages and the profiler itself; it is reported (baseline before loading,
  growth, peak during an unprofiled step via VmHWM) but an estimate of tensors cannot predict glibc's caching.
  On CUDA the same split is made for the GPU's allocations, and max_memory_allocated/reserved are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from ..config import DataConfig, LoraConfig, QuantConfig, TrainConfig, parse_targets
from .timeline import MARK, read_events, replay

STATIC = ("quantized_weights", "quant_constants", "unquantized_params", "adapters", "optimizer_state")


@dataclass(frozen=True)
class MeasureConfig:
    """One measured configuration: the recipe's settings (same defaults, config.py), flat for a command line."""

    model: str = "smollm2-135m"
    quant: str = QuantConfig.type
    rank: int = LoraConfig.r
    seq: int = DataConfig.max_length
    batch: int = TrainConfig.batch_size
    targets: str = LoraConfig.targets
    """all-linear, or a comma list of module names (q_proj,v_proj)."""
    dropout: float = LoraConfig.dropout
    optimizer: str = TrainConfig.optimizer
    steps: int = 3
    """Steps run: the first creates the optimizer state; the last is profiled; those between are timed."""
    device: str = "cpu"
    threads: int = 0
    seed: int = 0
    loss_chunk: int = TrainConfig.loss_chunk
    """Label tokens per cross-entropy chunk (train.loss_chunk)."""
    offload_activations: bool = False
    """train.offload_activations: checkpointed layer inputs in host memory (reported apart: `host`)."""
    mlp_chunk: int = 0
    """train.mlp_chunk: tiled MLP (0: off)."""
    dora: bool = False
    """lora.dora: DoRA on every LoRA target."""
    ia3: bool = False
    """An `ia3: {}` section: IA3 with its default targets (outputs k_proj, v_proj; input down_proj)."""
    replay_dropout: bool = True
    """False: LoRA dropout as plain nn.Dropout (saved copies), to measure what replaying the masks saves."""
    objective: str = TrainConfig.objective
    """train.objective: a preference objective steps a synthetic batch of 2 x batch rows (preference_batch)."""
    precompute_reference: bool = False
    """train.precompute_reference (dpo, ipo): the step looks its reference log-probs up instead of a pass."""
    overrides: str = ""
    """Extra recipe overrides, `;`-separated `section.key=value` (ablations; the estimate does not follow them)."""


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine_info() -> dict:
    """CPU model, cores, RAM and load average: what a benchmark result names its machine by."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        avx512_bf16 = "avx512_bf16" in flags
    except OSError:
        avx512_bf16 = None
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram, "avx512_bf16": avx512_bf16,
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def recipe_for(cfg: MeasureConfig, data_path: Path):
    from ..config import recipe_from_dict

    return recipe_from_dict({
        "model": {"path": cfg.model},
        "quant": {"type": cfg.quant},
        "lora": {"r": cfg.rank, "alpha": 2 * cfg.rank, "dropout": cfg.dropout, "targets": parse_targets(cfg.targets),
                 "dora": cfg.dora},
        **({"ia3": {}} if cfg.ia3 else {}),
        "data": {"path": str(data_path), "format": "text" if cfg.objective == "sft" else "preference",
                 "max_length": cfg.seq},
        "train": {"objective": cfg.objective, "precompute_reference": cfg.precompute_reference,
                  "steps": cfg.steps, "batch_size": cfg.batch, "optimizer": cfg.optimizer, "device": cfg.device,
                  "num_threads": cfg.threads, "seed": cfg.seed, "warmup_steps": 0, "loss_chunk": cfg.loss_chunk,
                  "offload_activations": cfg.offload_activations, "mlp_chunk": cfg.mlp_chunk},
    }, [o for o in cfg.overrides.split(";") if o.strip()])


def synthetic_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    """(B, S) random token ids, every position labelled, no padding: exactly B x S tokens, B x (S-1) targets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def preference_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    """A preference step's batch for `batch` units: 2 x batch rows of synthetic_batch (every position labelled,
    so that its sizes are exact), units alternately desirable (kto) and each row its own example index (for a
    precomputed reference)."""
    import torch

    out = synthetic_batch(vocab, 2 * batch, seq, seed)
    out["desirable"] = (torch.arange(2 * batch) // 2 % 2 == 0).long()
    out["example"] = torch.arange(2 * batch)
    return out


DATA = {"sft": [{"text": "memory measurement"}],  # what prepare() reads: the step's batch is synthetic
        "preference": [{"prompt": f"question {i}", "chosen": "yes", "rejected": "no"} for i in range(2)]}


def static_inventory(model, optimizer) -> dict[str, int]:
    """Bytes of the tensors that live across steps, by component; a storage shared by two names counts once."""
    import torch

    from ..quant.bnb import QuantLinear

    seen: set[int] = set()
    out = dict.fromkeys(STATIC, 0)

    def add(key, t):
        if t is None or t.device.type == "meta":
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr not in seen:
            seen.add(ptr)
            out[key] += t.untyped_storage().nbytes()

    from ..adapters.dora import DoRALinear

    for m in model.modules():
        if isinstance(m, DoRALinear):  # its frozen ||W||^2 (out,) fp32 belongs to the adapter, as estimated
            add("adapters", m.w2)
        for b in m.buffers(recurse=False):
            add("unquantized_params", b)
        if isinstance(m, QuantLinear):
            for name, t in m.quant_tensors().items():
                add("quantized_weights" if name == "qweight" else "quant_constants", t)
    head = model.get_output_embeddings()
    for m in model.modules():  # quant none: the decoder Linears' plain 16-bit weights, as the estimate counts them
        if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad:
            add("quantized_weights", m.weight)
    for p in model.parameters():
        add("adapters" if p.requires_grad else "unquantized_params", p)
    for m in optimizer.masters:
        add("optimizer_state", m)
    for state in optimizer.inner.state.values():
        for v in state.values():
            if hasattr(v, "untyped_storage"):
                add("optimizer_state", v)
    return out


class StepTagger:
    """Marks, in the profiler's timeline, where the loss head starts and ends and where each adapter gradient is
    accumulated, with zero-length `record_function` ranges placed by module and tensor hooks (memory_timeline
    reads them; train_step marks the optimizer phase itself). The optimizer is only read (its flat gradient
    buffers); nothing of the model or optimizer is patched."""

    def __init__(self, model, optimizer):
        import torch

        self.handles = []
        decoder = model.get_decoder()
        norm = getattr(decoder, "norm", None)

        def mark(name):
            with torch.profiler.record_function(MARK + name):
                pass

        def forward_start(module, args, kwargs=None):
            if torch.is_grad_enabled():  # the policy's forward (a preference step's no-grad passes come first)
                mark("forward")

        def head_start(module, args, kwargs=None):
            if not torch.is_grad_enabled():  # a no-grad pass (reference) has no loss head phase of its own
                return
            mark("head_start")
            x = args[0] if args else next(iter((kwargs or {}).values()))
            if x.requires_grad:  # fires once the gradient of the decoder's last hidden state is complete
                x.register_hook(lambda g: mark("head_end"))

        self.handles.append(decoder.register_forward_pre_hook(forward_start, with_kwargs=True))
        if norm is not None:
            self.handles.append(norm.register_forward_pre_hook(head_start, with_kwargs=True))
        for p in model.parameters():
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(lambda p: tag_grads(p)))

        def tag_grads(p):  # the optimizer's hook (registered first) has summed p.grad into its flat fp32 gradient
            for g in [p.grad, *optimizer.grad_buffers()]:
                if g is not None:
                    mark(f"grad::{g.untyped_storage().data_ptr()}")

    def remove(self):
        for h in self.handles:
            h.remove()


def estimate_config(recipe, device: str):
    """The estimate's settings for a recipe (estimate/recipe.py's one mapping), with the LoRA dropout mode this
    process runs."""
    from ..adapters.lora import LoRALinear
    from ..estimate.recipe import from_recipe

    return from_recipe(recipe, device, replay_dropout=LoRALinear.replay_dropout)


def measure(cfg: MeasureConfig) -> dict:
    """Load, step, measure: the JSON object `python -m qlora_kit.measure.breakdown` prints."""
    rss_base = rss_kib()
    import torch

    from ..estimate import analytic as me
    from ..train import loop as train
    from ..model.load import resolve

    with TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "one.jsonl"
        records = DATA["sft" if cfg.objective == "sft" else "preference"]
        data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        rss_imports = rss_kib()
        recipe = recipe_for(cfg, data_path)
        from ..adapters.lora import LoRALinear

        LoRALinear.replay_dropout = cfg.replay_dropout  # one configuration per process: a class switch is enough
        p = train.prepare(recipe)  # reads the data file now; nothing later does
    device = p.accelerator.device
    rss_loaded = rss_kib()
    config = json.loads((resolve(cfg.model) / "config.json").read_text())
    if cfg.objective == "sft":
        batch = synthetic_batch(config["vocab_size"], cfg.batch, cfg.seq, cfg.seed)
    else:
        batch = preference_batch(config["vocab_size"], cfg.batch, cfg.seq, cfg.seed)
        if cfg.precompute_reference:  # what reference.attach leaves: (examples,) fp32 on the device, by index
            getattr(p.loss_fn, "module", p.loss_fn).reference = torch.zeros(2 * cfg.batch, device=device)
    cuda = device.type == "cuda"

    def step():
        return train.train_step(p, [batch], lr=1e-4, max_grad_norm=1.0)

    t0 = time.perf_counter()
    first = step()
    first_s = time.perf_counter() - t0
    static = static_inventory(p.model, p.optimizer)
    times = []
    rss_reset = _reset_rss_peak()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(cfg.steps - 2, 0)):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    rss_step_peak = rss_kib("VmHWM") if rss_reset and times else None
    cuda_stats = {}
    if cuda:
        cuda_stats = {"max_allocated": torch.cuda.max_memory_allocated(),
                      "max_reserved": torch.cuda.max_memory_reserved()}

    tagger = StepTagger(p.model, p.optimizer)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        last = step()
    tagger.remove()
    timeline = replay(read_events(prof, device.type))
    static_total = sum(static.values())
    if cuda:  # the allocator's own count of the same step: a cross-check of the replayed events
        cuda_stats["profiled_step_max_allocated"] = torch.cuda.max_memory_allocated()

    def merged(transient: dict) -> dict:  # the estimate's keys and order; cuda_context is not a tensor
        return {k: static.get(k, 0) + transient.get(k, 0) for k in me.COMPONENTS}

    e = me.estimate(config, estimate_config(recipe, "cuda" if cuda else "cpu"))
    tokens = batch["input_ids"].numel()
    out = {
        "config": asdict(cfg),
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "peak_bytes": static_total + timeline["peak"],
        "static": static,
        "peak_phase": timeline["peak_phase"],
        "phases": {k: static_total + v for k, v in timeline["phase_peaks"].items()},
        "at_peak": merged(timeline["at_peak"]),
        "component_peaks": merged(timeline["component_peaks"]),
        "largest_at_peak": timeline["largest_at_peak"],
        "estimate": e.components, "estimate_total": e.total, "estimate_phase": e.peak_phase,
        "estimate_phases": e.phases, "estimate_sizes": e.sizes,
        "estimate_terms": {"activations": e.activation_terms, "logits_and_loss": e.logits_terms},
        # host memory outside the device peak: the offload store's buffers (pinned on CUDA), and the estimate's
        "host": {"offloaded_activations": p.offload.host_bytes() if p.offload else 0},
        "estimate_host": e.host,
        "rss": {"baseline_before_imports": rss_base * 1024, "after_imports": rss_imports * 1024,
                "after_load": rss_loaded * 1024, "step_peak": None if rss_step_peak is None else rss_step_peak * 1024,
                "process_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "cuda": cuda_stats,
        "loss": [round(first.loss, 4), round(last.loss, 4)],
        "first_step_s": round(first_s, 3),
        "tokens_per_s": round(tokens * len(times) / sum(times), 1) if times else round(tokens / first_s, 1),
    }
    out["error"] = (e.total - (me.CUDA_CONTEXT_BYTES if cuda else 0)) / out["peak_bytes"] - 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(MeasureConfig()).items():
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: a short summary)")
    args = vars(ap.parse_args(argv))
    as_json = args.pop("json")
    from ..errors import QloraKitError

    try:
        result = measure(MeasureConfig(**args))
    except QloraKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result["at_peak"].items():
            print(f"{k:20s} {v / 2**20:10.2f} MiB   estimate {result['estimate'].get(k, 0) / 2**20:10.2f} MiB")
        print(f"peak {result['peak_bytes'] / 2**20:.2f} MiB, estimate {result['estimate_total'] / 2**20:.2f} MiB "
              f"({result['error']:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
