"""Optimizers over bf16 adapters with fp32 master weights in flat buffers, and the learning-rate schedule.

Why master weights: adapters compute in bf16 (8 bits of mantissa). A typical AdamW step of lr = 2e-4 on a weight
of magnitude 0.04 is about one bf16 ulp (2.4e-4), so updates applied in bf16 are rounded away about half the time
and training stalls. The optimizer therefore steps an fp32 copy (4 bytes per adapter parameter, tiny next to the
base) and writes the result back into the bf16 parameters.

Why flat: an 8B model with all-linear LoRA has ~450 adapter tensors. Stepping them one by one costs ~4 kernel
launches each (up-cast, norm, clip, copy back) and bitsandbytes' 8-bit optimizers synchronise the GPU after every
parameter. So each parameter group keeps ONE flat fp32 master (n,) and ONE flat fp32 gradient (n,); every adapter
tensor owns a view (its shape) into both. The inner optimizer sees one parameter per group:

    group g:  master  (n_g,) fp32  = [A_0.flat | B_0.flat | A_1.flat | ...]   <- inner optimizer's only param
              grad    (n_g,) fp32  = same layout; master.grad is this buffer
              lr      = base lr x group ratio (LoRA+: B at `ratio` x A's rate, set_lr applies it)

Gradient accumulation: autograd would sum micro-batch gradients in the bf16 `.grad`. Instead a
post-accumulate-grad hook adds each adapter's freshly computed gradient into its fp32 view and frees the bf16 one,
so micro-batches are summed in fp32 on every device. DDP/FSDP: their reducers read `.grad` AFTER tensor hooks
run, so under a multi-process wrapper build with `hook=False`: autograd then accumulates in `.grad` (which DDP
all-reduces on the last micro-batch, as it always has) and `grads_to_masters()` up-casts it once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..config import TrainConfig


@dataclass
class ParamGroup:
    """Adapter parameters that share a learning-rate ratio (and optionally other optimizer options)."""

    params: list[torch.nn.Parameter]
    lr_ratio: float = 1.0  # this group's lr = set_lr's lr x lr_ratio (LoRA+: B's group has ratio > 1)
    options: dict = field(default_factory=dict)  # extra inner-optimizer keys for this group, e.g. weight_decay


class _Flat:
    """One group's flat fp32 master + gradient and the per-parameter views into them. The gradient buffer exists
    from the first adapter gradient of a step until zero_grad (like torch's set_to_none), so the loss head of the
    first micro-batch does not carry it."""

    def __init__(self, group: ParamGroup, hook: bool):
        self.group = group
        self.params = list(group.params)
        self.sizes = [p.numel() for p in self.params]
        device = self.params[0].device if self.params else torch.device("cpu")
        # (n,) fp32, a leaf the inner optimizer steps; the up-cast from bf16 is exact
        self.master = torch.cat([p.detach().reshape(-1).float() for p in self.params]) if self.params else \
            torch.zeros(0, device=device)
        self.views = self._split(self.master)
        self.grad_views: list[torch.Tensor] = []
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)] \
            if hook else []

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(p.shape) for v, p in zip(flat.split(self.sizes), self.params)]

    def ensure_grad(self) -> list[torch.Tensor]:
        if self.master.grad is None:
            self.master.grad = torch.zeros_like(self.master)  # (n,) fp32
            self.grad_views = self._split(self.master.grad)
        return self.grad_views

    def free_grad(self) -> None:
        self.master.grad, self.grad_views = None, []

    def _hook(self, i: int):
        def hook(p: torch.Tensor) -> None:  # p.grad: this micro-batch's gradient, compute dtype (bf16)
            self.ensure_grad()[i].add_(p.grad)  # fp32 accumulate (mixed-dtype in-place add: exact up-cast, fp32 sum)
            p.grad = None  # the bf16 gradient dies here: the next micro-batch does not sum into it
        return hook


class LossScaler:
    """Dynamic loss scaling for an fp16 residual stream (Micikevicius et al. 2018, arXiv 1710.03740): the loss is
    multiplied by a power of two before backward so small fp16 gradients do not flush to zero, and the fp32
    gradient divided by it (exactly: powers of two). A step whose gradient overflowed is skipped and the scale
    halved; after `growth_interval` good steps it doubles. bf16 needs none of this (fp32's range)."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale, self.growth_interval, self.good_steps = scale, growth_interval, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0


class MasterWeightOptimizer:
    """Steps flat fp32 masters of (possibly bf16) adapter parameters with an inner torch/bitsandbytes optimizer."""

    def __init__(self, groups: Sequence[ParamGroup] | Sequence[torch.nn.Parameter],
                 make: Callable[[list[dict]], torch.optim.Optimizer], hook: bool = True):
        if groups and not isinstance(groups[0], ParamGroup):
            groups = [ParamGroup(list(groups))]
        self.hook = hook
        self.flats = [_Flat(g, hook) for g in groups]
        self.params = [p for f in self.flats for p in f.params]
        self.masters = [v for f in self.flats for v in f.views]  # per-parameter fp32 views (shape of each param)
        self.inner = make([{"params": [f.master], **f.group.options} for f in self.flats])
        self.scaler: LossScaler | None = None  # set by train.prepare for an fp16 residual stream

    # ---- gradients -----------------------------------------------------------------------------------------------
    @property
    def grads(self) -> list[torch.Tensor]:
        """Per-parameter fp32 gradient views, in the order of `params` (allocated if no gradient arrived yet)."""
        return [g for f in self.flats for g in f.ensure_grad()]

    def grad_buffers(self) -> list[torch.Tensor]:
        """The flat fp32 gradients that exist now (none between zero_grad and the next backward)."""
        return [f.master.grad for f in self.flats if f.master.grad is not None]

    def grads_to_masters(self) -> list[torch.Tensor]:
        """The flat fp32 gradients, one per group. With the hook they already hold the step's sum; without it
        (DDP/FSDP) the parameters' `.grad` is up-cast into them here."""
        for f in self.flats:
            views = f.ensure_grad()
            if not self.hook:
                for p, g in zip(f.params, views):
                    g.copy_(p.grad) if p.grad is not None else g.zero_()
        return [f.master.grad for f in self.flats]

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradient, a 0-dim fp32 tensor on the device (no host sync). Computed as the norm
        of per-parameter norms, the order the per-tensor optimizer used, so CPU results stay bitwise the same."""
        grads = self.grads
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def scale_grads(self, factor: float) -> None:
        for g in self.grads_to_masters():
            g.mul_(factor)

    def zero_grad(self) -> None:
        for f in self.flats:
            f.free_grad()
            for p in f.params:
                p.grad = None

    # ---- stepping ------------------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """Every group's learning rate to lr x its ratio."""
        for group, f in zip(self.inner.param_groups, self.flats):
            group["lr"] = lr * f.group.lr_ratio

    def step(self) -> None:
        self.inner.step()
        self._copy_back()

    @torch.no_grad()
    def _copy_back(self) -> None:
        # One multi-tensor launch per group on CUDA (fp32 views -> bf16 params, rounding to nearest).
        for f in self.flats:
            if f.params:
                torch._foreach_copy_([p.data for p in f.params], f.views)

    @torch.no_grad()
    def sync_from_params(self) -> None:
        """Re-read the masters from the parameters, after code outside the optimizer changed them (e.g. a test
        that sets lora_B); otherwise the next step would write the old master values back."""
        for f in self.flats:
            if f.params:
                torch._foreach_copy_(f.views, [p.detach() for p in f.params])

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"inner": self.inner.state_dict(), "masters": [f.master.detach() for f in self.flats],
                 "sizes": [[p.numel() for p in f.params] for f in self.flats]}
        if self.scaler is not None:
            state["loss_scale"] = [self.scaler.scale, self.scaler.good_steps]
        return state

    def load_state_dict(self, state: dict) -> None:
        sizes = [[p.numel() for p in f.params] for f in self.flats]
        if state.get("sizes") != sizes:
            from ..errors import QloraKitError

            raise QloraKitError("the checkpoint's optimizer state does not match this run's adapters (it was written "
                                "by an older qlora-kit with per-tensor masters, or for other LoRA targets/rank). "
                                "Start the run again without --resume, or resume with the qlora-kit that wrote it.")
        with torch.no_grad():
            for f, saved in zip(self.flats, state["masters"]):
                f.master.copy_(saved)
        self._copy_back()
        self.inner.load_state_dict(state["inner"])
        if self.scaler is not None and "loss_scale" in state:
            self.scaler.scale, self.scaler.good_steps = state["loss_scale"]
        from ..quant.bnb import repage_optimizer_state  # bitsandbytes stays behind quant.py

        repage_optimizer_state(self.inner)

    def remove_hooks(self) -> None:
        for f in self.flats:
            for h in f.handles:
                h.remove()
            f.handles = []


def build_optimizer(params: Sequence[ParamGroup] | Sequence[torch.nn.Parameter], cfg: TrainConfig,
                    hook: bool = True) -> MasterWeightOptimizer:
    def make(groups: list[dict]) -> torch.optim.Optimizer:
        on_cuda = any(g["params"][0].is_cuda for g in groups)
        if cfg.optimizer == "adamw":
            # fused on CUDA: one kernel per group. The CPU keeps torch's default (single-tensor) implementation,
            # whose per-element math the per-tensor wrapper used, so CPU results are bitwise unchanged.
            return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if on_cuda else None)
        from ..quant.bnb import bnb_optimizer  # bitsandbytes stays behind quant.py

        return bnb_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)

    return MasterWeightOptimizer(params, make, hook)


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
