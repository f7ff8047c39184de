"""Checkpoint keys as transformers loads them: the Hub layout converted by transformers' own rules, streamed.

transformers 5 does not load every checkpoint as stored: `from_pretrained` renames keys (GPT-NeoX `embed_out` ->
`lm_head`, Mixtral `block_sparse_moe` -> `mlp`) and fuses per-expert weights into 3-D expert tensors
(`experts.N.gate_proj.weight` + `experts.N.up_proj.weight` for every N -> `experts.gate_up_proj` (E, 2I, H)).
Those rules live in transformers (`conversion_mapping.get_model_conversion_mapping`: WeightRenaming and
WeightConverter objects); we use them as they are, never a copy, so a model loads here exactly as it loads there.

What differs is the order and the memory: transformers collects the whole state dict; here the loader reads one
decoder layer's tensors at a time (load._layer_order), `route` names each checkpoint key's target, and a converter
runs as soon as its layer is read, on that layer's tensors only: peak memory is one layer's converted tensor (e.g.
one (E, 2I, H) expert stack) plus its sources, never a 16-bit copy of the model. save_pretrained writes the Hub
layout back (transformers reverses the same rules), which is how tests build checkpoints in the downloaded layout.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Callable, Iterable

import torch
from torch import nn


class Conversion:
    """transformers' rename/convert rules for one meta-built model, applied key by key."""

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        rules = get_model_conversion_mapping(model, add_legacy=True)
        self.renamings = [r for r in rules if isinstance(r, WeightRenaming)]
        self.converters = [r for r in rules if isinstance(r, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self.prefix = getattr(model, "base_model_prefix", None)
        self.names = {n: True for n in model.state_dict()}  # meta: names only (values never read)

    def route(self, key: str) -> tuple[str, str | None]:
        """(target name in the model, the converter's source pattern or None for a plain rename) of a checkpoint
        key, exactly as transformers' convert_and_load_state_dict_in_model computes it."""
        from transformers.core_model_loading import rename_source_key

        target, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix, self.names)
        if target not in self.names and key in self.names:  # a key that should not have been renamed
            target, pattern = rename_source_key(key, [], [], self.prefix, self.names)
        return target, pattern

    def convert(self, model: nn.Module, items: Iterable[tuple[str, Callable[[], torch.Tensor]]]):
        """Yield (model name, tensor) for one group of checkpoint tensors (e.g. one decoder layer): renamed ones as
        they are read, converted ones once the group is read (the converter needs all of its sources, e.g. every
        expert of the layer). Keys no rule maps into the model come out under their own name (the caller skips
        what the model does not have)."""
        from transformers.core_model_loading import dot_natural_key

        pending: dict[str, object] = {}
        for key, read in sorted(items, key=lambda kv: dot_natural_key(kv[0])):  # experts 0, 1, ..., 10 in order
            target, pattern = self.route(key)
            if pattern is None or target not in self.names:
                yield target, read()
                continue
            mapping = pending.setdefault(target, deepcopy(self.by_pattern[pattern]))
            mapping.add_tensor(target, key, pattern, read)  # a callable: read when the converter runs
        for target, mapping in pending.items():
            out = mapping.convert(target, model=model, config=getattr(model, "config", None))
            for name, value in out.items():
                yield name, value[0] if isinstance(value, list) else value
            del out

    def target_of(self, key: str) -> str:
        return self.route(key)[0]
