"""FSDP2-QLoRA: the frozen base sharded across ranks, one decoder layer gathered at a time.

`torch.distributed.fsdp.fully_shard` shards every parameter of a module along dim 0 (per-parameter sharding, a
DTensor per parameter). Applied to each decoder layer as soon as it is loaded (model.load_base's `on_layer`), a
rank keeps 1/N of the layer's frozen tensors: the packed 4-bit codes (numel/2, 1) uint8, the absmax constants,
the codebooks (QuantLinear keeps them as frozen parameters for this reason) and the 16-bit norms. In forward and
in backward (activation checkpointing recomputes the layer) FSDP all-gathers one layer, the layer dequantizes
from the gathered codes exactly as in one process, and the gathered copy is freed after the layer:

    rank memory ~ (base / N) + one gathered layer (quantized) + prefetch of the next + replicated adapters

The LoRA adapters are NOT sharded (`ignored_params`): they are small, every rank keeps a full copy and their
gradients are summed by distributed.World.all_reduce_ once per step, as under ddp. So the optimizer, its state
and the checkpoint are the same as in one process, and rank 0 writes the full adapter without a gather.
The input embeddings are their own unit (gathered for the lookup only: their output needs no gradient, so backward
never gathers them again). lm_head is the unit of loss.LossHead, which runs every loss chunk in one forward: it is
gathered for the loss's forward, freed, gathered again when backward reaches the loss and freed before the decoder's
backward (at 70B, 128256 x 8192 bf16 = 1.96 GiB that would otherwise stay whole for the step). The final norm
belongs to the root unit (CausalLMLoss), gathered for the whole step. Tied embeddings stay with lm_head in the root
(a tensor belongs to one unit, and the embedding lookup runs outside the head).
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import World


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder's repeated blocks (Llama, Mistral, Qwen: model.model.layers)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return list(layers)


def _mesh(world: World, device: torch.device):
    from torch.distributed.device_mesh import DeviceMesh

    import torch.distributed as dist

    return DeviceMesh.from_group(world.group or dist.group.WORLD, device.type)


def shard(module: nn.Module, world: World, device: torch.device) -> None:
    """Shard `module`'s parameters (except trainable ones: adapters stay replicated) over every rank."""
    if not world.distributed:
        return  # one process: the no-op shard, so an fsdp recipe runs unchanged on one device
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in module.parameters() if p.requires_grad}
    fully_shard(module, mesh=_mesh(world, device), ignored_params=trainable or None)


def shard_embeddings(model: nn.Module, world: World, device: torch.device) -> None:
    """The input embeddings as their own unit, unless tied to lm_head (a tensor can belong to one unit only; the
    config decides: while loading, the tie is not made yet)."""
    if world.distributed and not _tied(model):
        shard(model.get_input_embeddings(), world, device)


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def shard_root(loss_fn: nn.Module, model: nn.Module, world: World, device: torch.device) -> None:
    """The loss head as its own unit (untied lm_head), then the root unit: whatever no layer owns (the final norm;
    tied embeddings + lm_head), around the module whose forward a step calls (the loss), so FSDP gathers them at
    the start of the step and runs its backward hooks."""
    if not world.distributed:
        return
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in model.parameters() if p.requires_grad}
    ignored = set(trainable)
    if not _tied(model):
        fully_shard(loss_fn.head, mesh=_mesh(world, device), ignored_params=trainable or None)
        # lm_head is also reachable from the root through model.lm_head (the same module): the head unit owns it
        ignored |= {p for p in loss_fn.head.parameters()}
    fully_shard(loss_fn, mesh=_mesh(world, device), ignored_params=ignored or None)


class LoadSharder:
    """model.load_base's `on_layer`: shards each decoder layer, then the embeddings, as soon as they are loaded, and
    records the most frozen bytes this rank held at any moment of loading (`load_peak`: what the issue bounds by
    the rank's final share plus about one layer in 16 bits; the root's lm_head is still whole at the last check)."""

    def __init__(self, world: World, device: torch.device):
        self.world, self.device, self.load_peak = world, device, 0

    def _measure(self, model: nn.Module) -> None:
        self.load_peak = max(self.load_peak, sum(local_frozen_bytes(model).values()))

    def __call__(self, model: nn.Module, group: int) -> None:
        from ..model.load import EMBEDDINGS

        self._measure(model)
        if group == EMBEDDINGS:
            shard_embeddings(model, self.world, self.device)
        else:
            shard(decoder_layers(model)[group], self.world, self.device)

    def shard_root(self, loss_fn: nn.Module, model: nn.Module) -> None:
        self._measure(model)
        shard_root(loss_fn, model, self.world, self.device)


def local_frozen_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of frozen tensors this rank stores: the quantized Linears' codes + constants, and everything else
    frozen (embeddings, norms, lm_head). A sharded parameter counts its local shard (DTensor.to_local)."""
    from ..quant.bnb import QuantLinear

    quant_ids, out, seen = set(), {"quantized": 0, "other_frozen": 0}, set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quant_ids |= {id(t) for t in m.quant_tensors().values()}
    for p in model.parameters():
        if p.requires_grad or id(p) in seen or p.device.type == "meta":  # meta: not loaded yet
            continue
        seen.add(id(p))
        local = p.to_local() if hasattr(p, "to_local") else p
        out["quantized" if id(p) in quant_ids else "other_frozen"] += local.numel() * local.element_size()
    return out
