"""transformers' `Conv1D` (GPT-2 and its descendants): a Linear whose weight is stored transposed, (in, out),
y = x @ W + b. load_base swaps each for an nn.Linear before loading and transposes its weight to (out, in) as it
streams in, so quantization, adapters (PEFT adapts Conv1D with fan_in_fan_out, with the same (r, in) / (out, r)
tensors) and generation see one kind of layer; the exporters write it back in the (in, out) layout."""

from __future__ import annotations

import torch
from torch import nn


def transposed_names(model: nn.Module) -> list[str]:
    """Names of the transformers Conv1D modules of `model` (weight (in, out)) but its output embeddings."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D) and m is not head]


def linear_from_conv1d(model: nn.Module) -> set[str]:
    """Swap every Conv1D (transposed_names) of `model` for an nn.Linear of the same (in, out) and bias, in place:
    the same function of x. On the meta device (load_base) the weight is transposed as it streams in; a real
    model's weight is copied transposed here. Returns the names swapped."""
    names = transposed_names(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        nx, nf = old.weight.shape  # (in, out)
        new = nn.Linear(nx, nf, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        if old.weight.device.type != "meta":
            with torch.no_grad():
                new.weight.copy_(old.weight.t())
                if old.bias is not None:
                    new.bias.copy_(old.bias)
        new.requires_grad_(old.weight.requires_grad)
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return set(names)


def layer_weights(config) -> tuple[set[str], set[str]]:
    """(`<module>.weight` of every Linear or Conv1D but the output embeddings: what load_base quantizes, those of
    them stored as Conv1D (in, out)), from the model of `config` (a transformers config) built on the meta device
    (no memory, a second or two)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    conv = {f"{n}.weight" for n in transposed_names(model)}
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head} | conv, conv
