"""Layer 0's checkpoint keeps the token ids, not the embeddings: its input is re-embedded in backward.

Every checkpointed decoder layer keeps its input, (B, S, H) in the compute dtype, from forward to its recompute in
backward: L x 2 H bytes per token, most of what grows with the sequence. Layer 0's input is the embedding of the
token ids, a table lookup: the ids (B, S), which the batch holds anyway, give it back exactly (a gather, the same
bytes). `enable` routes layer 0's non-reentrant checkpoint through a saved-tensor hook pair that packs that input
as (embedding module, ids) and unpacks it with the lookup, under no_grad: 2 H bytes per token fewer on the device
(1/L of the layer inputs), bitwise the same gradients (tests/test_long_context.py).

The hook recognises the input as the very tensor the embedding module returned in this forward (a forward hook
records it); anything else (a model that scales or adds to the embeddings before layer 0) is kept as usual. With
train.offload_activations the layer inputs are on the host already, and layer 0's goes there like the others.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint


class _Reembed:
    def __init__(self, embed: torch.nn.Module):
        self.embed = embed
        self.last: tuple[weakref.ref, torch.Tensor] | None = None  # (the embedding output, the ids it came from)
        self.stats = {"packed": 0, "unpacked": 0}
        embed.register_forward_hook(self._record)

    def _record(self, module, args, out):
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
            self.last = (weakref.ref(out), args[0])

    def checkpoint(self, fn, *args, **kwargs):
        kwargs.setdefault("use_reentrant", False)
        last, self.last = self.last, None
        x = args[0] if args else None
        if kwargs["use_reentrant"] or last is None or x is None or last[0]() is not x:
            return checkpoint(fn, *args, **kwargs)
        # the hooks live as long as the saved tensors: they must not hold x itself, only how to recognise it
        ids, shape, ptr, dtype = last[1], x.shape, x.data_ptr(), x.dtype
        del x

        def pack(t):
            if t.shape == shape and t.data_ptr() == ptr and t.dtype == dtype:
                self.stats["packed"] += 1
                return ("ids", ids)
            return t

        def unpack(p):
            if isinstance(p, tuple):
                self.stats["unpacked"] += 1
                with torch.no_grad():
                    return self.embed(p[1])  # (B, S, H): the same lookup, the same bytes
            return p

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return checkpoint(fn, *args, **kwargs)


def enable(model: torch.nn.Module) -> _Reembed | None:
    """Re-embed layer 0's input in backward (checkpointing already enabled on a transformers decoder model).
    Returns the hook object (its `stats` count packs and unpacks), or None when the model has no such layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not layers or embed is None:
        return None
    r = _Reembed(embed)
    layers[0]._gradient_checkpointing_func = partial(_Reembed.checkpoint, r)
    if hasattr(model, "disable_input_require_grads"):
        # transformers makes the embedding output a leaf that requires grad (a hack for reentrant checkpointing);
        # its AccumulateGrad node would keep layer 0's input alive until backward. Non-reentrant checkpointing does
        # not need it.
        model.disable_input_require_grads()
    return r
