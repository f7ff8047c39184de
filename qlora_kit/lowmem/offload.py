"""Offloaded activation checkpoints: each checkpointed decoder layer's input lives in host memory between the
layer's forward and its recompute in backward (`train.offload_activations`).

With non-reentrant checkpointing (torch.utils.checkpoint, use_reentrant=False) the only tensors a decoder layer
keeps after its forward are its checkpoint inputs, (B, S, H) in the compute dtype: torch saves them as
SavedTensors *before* entering its own saved-tensor hooks, so an outer `saved_tensors_hooks` sees exactly those
inputs and nothing from inside the layer. `offloaded_checkpoint` wraps each layer's checkpoint in the hooks of an
`OffloadStore`:

    forward, layer i:   pack(h_i)    h_i -> host buffer (CUDA: pinned, copied on a side stream; the device tensor
                                     is freed as soon as the copy is done)
    backward, layer i:  unpack(h_i)  host -> device (waits only if the prefetch has not finished), then starts
                                     copying h_{i-1} so it arrives while layer i is recomputed and differentiated

The copies are exact (the same bytes come back), so gradients are bitwise those of plain checkpointing
(tests/test_long_context.py). Host buffers are kept in a pool and reused step after step (pinned allocation is
slow); `host_bytes()` is what the pool holds. On the CPU the same code runs without streams or pinning: the
"device" copies are ordinary tensors and the pool is host memory counted apart, so `qlora-kit bench memory`
reports device-resident and offloaded bytes separately on any machine.

Device memory for layer inputs drops from L x (B, S, H) to 2 x (B, S, H) (the layer in backward + the prefetched
one); host memory grows by L x (B, S, H). Cost: one device->host and one host->device copy of each layer input per
step, overlapped with compute on CUDA.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint


class _Entry:
    """One offloaded tensor: its host copy, where it goes back to, and a prefetched device copy if one is under way."""

    __slots__ = ("store", "index", "host", "flat", "shape", "dtype", "device", "ready", "prefetched", "__weakref__")

    def __init__(self, store: "OffloadStore", index: int, flat: torch.Tensor, host: torch.Tensor, src: torch.Tensor,
                 ready):
        # flat: the pool's 1-D buffer (it goes back to the pool whole); host: its first numel elements as src.shape
        self.store, self.index, self.flat, self.host = store, index, flat, host
        self.shape, self.dtype, self.device = src.shape, src.dtype, src.device
        self.ready = ready  # CUDA event: the device->host copy is done (None on the CPU)
        self.prefetched: tuple[torch.Tensor, object] | None = None

    def __del__(self):  # autograd dropped the saved tensor (its layer is done, or the graph was freed)
        store = self.store
        if store is not None and self.host is not None:
            store._release(self)


class OffloadStore:
    """Host-side home of checkpointed layer inputs for one model; `hooks()` is the saved-tensor hooks pair."""

    def __init__(self, device: torch.device | str, prefetch: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = prefetch
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._free: list[torch.Tensor] = []  # flat host buffers (pinned on CUDA) not in use, reused by size
        self._pool_bytes = 0
        # pack order -> entry, for the prefetch of the previous layer's input; weak: autograd owns the entries
        self._live: weakref.WeakValueDictionary[int, _Entry] = weakref.WeakValueDictionary()
        self._counter = 0
        self.stats = {"packed": 0, "unpacked": 0, "prefetched": 0, "prefetch_hits": 0}

    # ---- host buffers ------------------------------------------------------------------------------------------

    def _buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The smallest free host buffer of `dtype` with at least `numel` elements, or a new one."""
        fits = [i for i, b in enumerate(self._free) if b.dtype == dtype and b.numel() >= numel]
        if fits:  # by index: list.remove would compare tensors with ==, elementwise
            return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        buf = torch.empty(numel, dtype=dtype, pin_memory=self.cuda)  # pinned: async copies, full PCIe bandwidth
        self._pool_bytes += buf.numel() * buf.element_size()
        return buf

    def _release(self, entry: _Entry) -> None:
        self._free.append(entry.flat)  # the flat buffer, never the shaped view: a later batch's shape differs
        entry.host, entry.flat, entry.prefetched = None, None, None
        self._live.pop(entry.index, None)

    def host_bytes(self) -> int:
        """Bytes of host memory the store holds (buffers in use and kept for reuse)."""
        return self._pool_bytes

    def clear(self) -> None:
        """Drop the free buffers (those in use stay until their layer's backward)."""
        self._pool_bytes -= sum(b.numel() * b.element_size() for b in self._free)
        self._free.clear()

    # ---- the hooks ---------------------------------------------------------------------------------------------

    def pack(self, t: torch.Tensor) -> _Entry:
        flat = self._buffer(t.numel(), t.dtype)
        host = flat[: t.numel()].view(t.shape)
        ready = None
        if self.cuda and t.is_cuda:
            compute = torch.cuda.current_stream(t.device)
            self.stream.wait_stream(compute)  # t is complete on the compute stream before we read it
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.stream)
            t.record_stream(self.stream)  # the allocator must not hand t's memory out until the copy is done
        else:
            host.copy_(t)
        entry = _Entry(self, self._counter, flat, host, t, ready)
        self._live[self._counter] = entry
        self._counter += 1
        self.stats["packed"] += 1
        return entry

    def _to_device(self, entry: _Entry) -> tuple[torch.Tensor, object]:
        """Start copying an entry back; returns (device tensor, event that marks the copy done or None)."""
        if not self.cuda:
            return entry.host.clone(), None
        compute = torch.cuda.current_stream(entry.device)
        out = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)  # owned by the compute stream
        self.stream.wait_stream(compute)  # `out`'s memory may have been in use by queued compute kernels
        with torch.cuda.stream(self.stream):
            out.copy_(entry.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    def unpack(self, entry: _Entry) -> torch.Tensor:
        if entry.host is None:
            raise RuntimeError("offloaded activation was already released: offload_activations supports one "
                               "backward per forward (no retain_graph)")
        if entry.prefetched is not None:
            out, done = entry.prefetched
            entry.prefetched = None
            self.stats["prefetch_hits"] += 1
        else:
            out, done = self._to_device(entry)
        if done is not None:
            torch.cuda.current_stream(entry.device).wait_event(done)
        self.stats["unpacked"] += 1
        if self.prefetch:  # backward runs the layers in reverse: the input packed just before is needed next
            prev = self._live.get(entry.index - 1)
            if prev is not None and prev.prefetched is None and prev.host is not None:
                prev.prefetched = self._to_device(prev)
                self.stats["prefetched"] += 1
        return out

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offloaded_checkpoint(store: OffloadStore, fn, *args, **kwargs):
    """torch's non-reentrant checkpoint of `fn(*args)` whose saved inputs go to `store` (see the module doc)."""
    kwargs.setdefault("use_reentrant", False)
    if kwargs["use_reentrant"]:
        raise ValueError("offloaded checkpoints need non-reentrant checkpointing (use_reentrant=False)")
    with store.hooks():
        return checkpoint(fn, *args, **kwargs)


def enable(model: torch.nn.Module, store: OffloadStore) -> int:
    """Route every checkpointed decoder layer of a transformers model (checkpointing already enabled) through
    `store`. Returns the number of layers; 0 means the model has no checkpointed layers to offload."""
    from functools import partial

    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m._gradient_checkpointing_func = partial(offloaded_checkpoint, store)
            n += 1
    if n and hasattr(model, "disable_input_require_grads"):
        # transformers makes the embedding output a leaf that requires grad (a hack for reentrant checkpointing);
        # autograd's AccumulateGrad node would then keep layer 0's input on the device until backward. Non-reentrant
        # checkpointing does not need it.
        model.disable_input_require_grads()
    return n
