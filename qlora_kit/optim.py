"""Optimizers over bf16 adapters with fp32 master weights, and the learning-rate schedule.

Why master weights: adapters compute in bf16 (8 bits of mantissa). A typical AdamW step of lr = 2e-4 on a weight
of magnitude 0.04 is about one bf16 ulp (2.4e-4), so updates applied in bf16 are rounded away about half the time
and training stalls. The optimizer therefore steps an fp32 copy (4 bytes per adapter parameter, tiny next to the
base) and writes the result back into the bf16 parameters.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainConfig


class MasterWeightOptimizer:
    """Wraps a torch optimizer that steps fp32 masters of (possibly bf16) parameters."""

    def __init__(self, params: list[torch.nn.Parameter], make: Callable[[list[dict]], torch.optim.Optimizer],
                 lr_scales: list[float] | None = None):
        self.params = params
        # An fp32 parameter is its own master; a bf16 one gets an fp32 copy.
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in params]
        # One parameter group per learning-rate multiplier (LoRA+: B at plus_ratio x lr); one group when all are 1.
        groups: dict[float, list[torch.Tensor]] = {}
        for m, s in zip(self.masters, lr_scales or [1.0] * len(params)):
            groups.setdefault(float(s), []).append(m)
        self.inner = make([{"params": ms, "lr_scale": s} for s, ms in groups.items()])

    def set_lr(self, lr: float) -> None:
        """lr for the step about to be taken: each group gets lr x its lr_scale. (Checkpoints from before
        parameter groups have no lr_scale: they had one group at scale 1.)"""
        for group in self.inner.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.inner.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if p is not m:
                    p.copy_(m)

    def grads_to_masters(self) -> list[torch.Tensor]:
        """Move (accumulated) gradients onto the masters in fp32; returns them (for clipping and finiteness)."""
        grads = []
        for p, m in zip(self.params, self.masters):
            if p is not m:
                m.grad = None if p.grad is None else p.grad.float()
            if m.grad is not None:
                grads.append(m.grad)
        return grads

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masters": [m.detach() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                m.copy_(saved)
                if p is not m:
                    p.copy_(saved)
        self.inner.load_state_dict(state["inner"])


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig,
                    lr_scales: list[float] | None = None) -> MasterWeightOptimizer:
    """`lr_scales[i]`: params[i]'s learning rate as a multiple of the schedule's (default all 1)."""

    def make(masters: list[dict]) -> torch.optim.Optimizer:
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(masters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from .quant import bnb_optimizer  # bitsandbytes stays behind quant.py

        return bnb_optimizer(cfg.optimizer, masters, cfg.lr, cfg.weight_decay)

    return MasterWeightOptimizer(params, make, lr_scales)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
