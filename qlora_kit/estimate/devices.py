"""Memory per device of a multi-process run (`qlora-kit estimate --gpus N --parallel ddp|fsdp`), from the one-device
estimate (memory_estimate.py) of one rank's micro-batch. Pure Python, no torch.

What each rank holds (the design of distributed.py and fsdp.py):
    ddp   everything of one device: the whole frozen base, the adapters, their optimizer, one micro-batch's
          activations. The gradient sum runs in place on the optimizer's flat fp32 gradient: no extra buffer.
    fsdp  frozen_shard      (quantized codes + constants + 16-bit norms/embeddings) / N, rounded up per rank
          gathered_layers   decoder layers gathered at the phase's peak: two in the decoder's backward (the one
                            computing and the one prefetched), one at the loss head (the prefetch), none at the step
          head_gathered     lm_head (loss.LossHead's unit), gathered only around the loss, in forward and backward
          root_gathered     the final norm (the root unit), gathered for the whole step; the embeddings are their
                            own unit (gathered only for the lookup) unless tied: then embeddings and lm_head are root
          + the replicated adapters, optimizer and gradients, and one micro-batch's activations.
Not modelled: NCCL's own buffers (tens of MiB per GPU) and allocator fragmentation between gathers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Literal

from . import analytic as me

Parallel = Literal["ddp", "fsdp"]
FROZEN = ("quantized_weights", "quant_constants", "unquantized_params")


@dataclass(frozen=True)
class DeviceEstimate:
    gpus: int
    parallel: str
    per_device: dict[str, int]  # component -> bytes on each device at its peak phase
    total: int  # bytes per device at the peak
    one_device: me.Estimate  # the single-device estimate of the same micro-batch (for comparison)
    peak_phase: str

    def to_dict(self) -> dict:
        return {"gpus": self.gpus, "parallel": self.parallel, "per_device": self.per_device, "total": self.total,
                "peak_phase": self.peak_phase, "one_device_total": self.one_device.total}


def _unquantized_split(s: me.ModelShapes) -> tuple[int, int, int, int]:
    """Bytes (bf16) of the embeddings, of the loss head's unit (lm_head, when untied), of the root unit (the final
    norm; embeddings + lm_head too when tied) and of one layer's norms and biases (sharded with their layer)."""
    other = s.other
    embed = 2 * other.get("embed_tokens", 0)
    head = 2 * other.get("lm_head", 0)
    root = 2 * other.get("norm", 0)
    layer = (2 * sum(other.values()) - embed - head - root) // max(s.layers, 1)
    if s.tied:
        root, embed, head = root + embed + head, 0, 0
    return embed, head, root, layer


# Decoder layers gathered at each phase's peak: the head's backward prefetches the last layer; in the decoder's
# backward one layer computes while the next is prefetched; the optimizer step gathers nothing; a preference step's
# no-grad reference pass runs forward like the decoder (one layer computing, the next prefetched).
_LAYERS_GATHERED = {"loss_head": 1, "decoder_backward": 2, "optimizer_step": 0, "reference_pass": 2}


def per_device(config: dict, cfg: me.EstimateConfig, gpus: int, parallel: Parallel) -> DeviceEstimate:
    """Per-device bytes with `gpus` ranks, each training a micro-batch of cfg.batch x cfg.seq."""
    if parallel == "fsdp" and gpus > 1:  # prepare() keeps layer 0's input there (the embeddings are sharded)
        cfg = replace(cfg, reembed=False)
    e = me.estimate(config, cfg)
    s = e.shapes
    frozen = sum(e.components[k] for k in FROZEN)
    if parallel == "ddp" or gpus == 1:
        return DeviceEstimate(gpus, parallel, dict(e.components), e.total, e, e.peak_phase)
    embed, head, root, layer_norms = _unquantized_split(s)
    layer_q = (e.components["quantized_weights"] + e.components["quant_constants"]) // s.layers + layer_norms
    shard = -(-frozen // gpus)

    def gathered(phase: str) -> dict[str, int]:  # the frozen bytes on a device at this phase's peak
        return {"frozen_shard": shard, "gathered_layers": _LAYERS_GATHERED[phase] * layer_q,
                "head_gathered": head if phase == "loss_head" else 0, "root_gathered": root}

    phases = {name: total - frozen + sum(gathered(name).values()) for name, total in e.phases.items()}
    peak = max(phases, key=phases.get)
    # the one-device components at this phase's peak (the frozen ones replaced by the shard and the gathers)
    per = {**{k: v for k, v in e.by_phase[peak].items() if k not in FROZEN}, **gathered(peak)}
    assert sum(per.values()) == phases[peak]
    return DeviceEstimate(gpus, parallel, per, phases[peak], e, peak)


def max_seq_table(config: dict, cfg: me.EstimateConfig, gpus: int, parallel: Parallel,
                  gpus_gib=me.GPU_SIZES_GIB) -> list[dict]:
    """Longest sequence per GPU size, per device (bisection on seq, as memory_estimate.max_seq_table)."""
    cap = me.count_params(config).max_positions
    rows = []
    for gib in gpus_gib:
        def fits(seq: int, gib: int = gib) -> bool:
            return per_device(config, replace(cfg, seq=seq), gpus, parallel).total <= gib * me.GiB
        if not fits(1):
            best, capped = None, False
        elif fits(cap):
            best, capped = cap, True
        else:
            lo, hi = 1, cap
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            best, capped = lo, False
        rows.append({"gpu_gib": gib, "gpu_bytes": gib * me.GiB, "max_seq": best, "capped": capped})
    return rows


# Settings tried, one at a time and then together, when a configuration does not fit (field, value, recipe key).
_KNOBS = (("optimizer", "paged_adamw8bit", "train.optimizer=paged_adamw8bit"),
          ("offload_activations", True, "train.offload_activations=true"),
          ("mlp_chunk", 1024, "train.mlp_chunk=1024"),
          ("batch", 1, "train.batch_size=1 (raise train.grad_accum to keep the global batch)"),
          ("rank", 8, "lora.r=8"))


def what_fits(config: dict, cfg: me.EstimateConfig, gpus: int, parallel: Parallel, budget: int) -> list[dict]:
    """Settings that bring the per-device total under `budget`: each knob alone, then the knobs accumulated in
    order (so the answer names the fewest changes that fit, as far as this greedy search goes), then more GPUs."""
    names = {f.name for f in dataclasses.fields(cfg)}
    knobs = [k for k in _KNOBS if k[0] in names and getattr(cfg, k[0]) != k[1]]
    found, seen = [], set()

    def try_(changes: list[tuple[str, object, str]], gpus_: int) -> None:
        c = replace(cfg, **{f: v for f, v, _ in changes})
        total = per_device(config, c, gpus_, parallel).total
        key = (tuple(k for _, _, k in changes), gpus_)
        if total <= budget and key not in seen:
            seen.add(key)
            found.append({"changes": [k for _, _, k in changes] + ([f"--gpus {gpus_}"] if gpus_ != gpus else []),
                          "total": total})

    for k in knobs:
        try_([k], gpus)
    for i in range(2, len(knobs) + 1):
        try_(knobs[:i], gpus)
    if parallel == "fsdp":
        for more in (gpus * 2, gpus * 4):
            try_([], more)
    return found
