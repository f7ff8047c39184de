"""Run by test_distributed.py on each of 2 ranks: one FSDP training step of a recipe, recording whether lm_head's
weight is gathered (a plain tensor) or sharded (a DTensor) at moments of the step. Prints one JSON line (rank 0).

    RANK=.. WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. python tests/fsdp_head_probe.py RECIPE.yaml"""

from __future__ import annotations

import json
import sys

import torch
from torch.distributed.tensor import DTensor

from qlora_kit.train import distributed, loop as train
from qlora_kit.config import load_recipe
from qlora_kit.train.fsdp import decoder_layers


def main() -> None:
    world = distributed.detect()
    distributed.start(world)
    p = train.prepare(load_recipe(sys.argv[1]), world)
    lm_head = p.model.get_output_embeddings()
    seen: dict[str, list[bool]] = {"decoder_forward": [], "loss_forward": [], "decoder_backward": []}

    def gathered() -> bool:
        return not isinstance(lm_head.weight, DTensor)

    def layer_hook(module, args, output):  # also runs in the checkpoint's recompute, i.e. inside backward
        seen["decoder_backward" if module.training_forward_done else "decoder_forward"].append(gathered())
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda g: seen["decoder_backward"].append(gathered()))

    for layer in decoder_layers(p.model):
        layer.training_forward_done = False
        layer.register_forward_hook(layer_hook)
    p.loss_fn.head.lm_head.register_forward_hook(lambda m, a, o: seen["loss_forward"].append(gathered()))

    def loss_pre_hook(module, args):
        for layer in decoder_layers(p.model):
            layer.training_forward_done = True  # every later layer forward is backward's recompute

    p.loss_fn.head.register_forward_pre_hook(loss_pre_hook)
    g = torch.Generator().manual_seed(world.rank)
    ids = torch.randint(3, 200, (2, 24), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    train.train_step(p, [batch], lr=1e-3, max_grad_norm=1.0)
    if world.is_main:
        print(json.dumps(seen))
    distributed.stop(world)


if __name__ == "__main__":
    main()
