"""Replaying a profiled training step's allocations (part of `memory_measure`): where the loss head starts and
ends, where each adapter gradient is accumulated, and the split of the transient bytes at the step's peak."""

from __future__ import annotations

import heapq

TRANSIENT = ("adapter_grads", "activations", "logits_and_loss", "optimizer_state")
_MARK = "qlora_kit::mark::"


class StepTagger:
    """Marks, in the profiler's timeline, where the loss head starts and ends and where each adapter gradient is
    accumulated, with zero-length `record_function` ranges (module and tensor hooks place them)."""

    def __init__(self, model, optimizer):
        import torch

        self.handles = []
        decoder = model.get_decoder()
        norm = getattr(decoder, "norm", None)

        def mark(name):
            with torch.profiler.record_function(_MARK + name):
                pass

        def head_start(module, args, kwargs=None):
            mark("head_start")
            x = args[0] if args else next(iter((kwargs or {}).values()))
            if x.requires_grad:  # fires once the gradient of the decoder's last hidden state is complete
                x.register_hook(lambda g: mark("head_end"))

        if norm is not None:
            self.handles.append(norm.register_forward_pre_hook(head_start, with_kwargs=True))
        for p in model.parameters():
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(lambda p: tag_grads(p)))

        def tag_grads(p):  # the optimizer's hook (registered first) has summed p.grad into its flat fp32 gradient
            for g in [p.grad, *optimizer.grad_buffers()]:
                if g is not None:
                    mark(f"grad::{g.untyped_storage().data_ptr()}")

        # After backward: instance attributes shadow the optimizer's methods (deleted again in `remove`).
        self.optimizer = optimizer
        for name in ("grads_to_masters", "step"):
            setattr(optimizer, name, self._marked(getattr(optimizer, name), name, mark))

    @staticmethod
    def _marked(method, name, mark):
        def wrapper(*args, **kwargs):
            mark(name)
            return method(*args, **kwargs)
        return wrapper

    def remove(self):
        for h in self.handles:
            h.remove()
        del self.optimizer.grads_to_masters, self.optimizer.step


def transient_timeline(prof, device_type: str, top_n: int = 8) -> dict:
    """Replay a profiled step's allocations and frees in time order; tag each allocation by the phase it was made
    in (decoder, loss head, after backward) or as an adapter gradient; return the split at the transient peak.

    Reads `experimental_event_tree()`, the event tree torch's own memory profiler uses (allocation address, size,
    time): a private API, pinned by tests/test_memory_measure.py."""
    from torch._C._profiler import _EventType  # the profiler's event tree: allocation ptr, size, time

    events = []

    def walk(nodes):
        for n in nodes:
            if n.tag == _EventType.Allocation:
                f = n.extra_fields
                if f.device.type == device_type:
                    op = n.parent.name if n.parent is not None else ""
                    events.append((n.start_time_ns, 1, f.ptr, f.alloc_size, op))
            elif n.name.startswith(_MARK):
                events.append((n.start_time_ns, 0, n.name[len(_MARK):], 0, ""))
            walk(n.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort(key=lambda e: (e[0], e[1]))
    # mark -> (phase, the component of what is allocated from there on)
    marks = {"head_start": ("loss_head", "logits_and_loss"), "head_end": ("decoder_backward", "activations"),
             "grads_to_masters": ("optimizer_step", "optimizer_state"), "step": ("optimizer_step", "optimizer_state")}
    phase, cat_now = "decoder_backward", "activations"
    live: dict[int, tuple[int, str, str]] = {}  # ptr -> (bytes, component, op)
    now = dict.fromkeys(TRANSIENT, 0)
    best, at_peak, own_peak, top, phase_peak, peak_phase = 0, dict(now), dict(now), [], {}, None
    for _, kind, what, size, op in events:
        if kind == 0:
            if what in marks:
                phase, cat_now = marks[what]
            elif what.startswith("grad::"):
                ptr = int(what[6:])
                if ptr in live and live[ptr][1] != "adapter_grads":
                    n, cat, o = live[ptr]
                    now[cat] -= n
                    now["adapter_grads"] += n
                    live[ptr] = (n, "adapter_grads", o)
            continue
        if size > 0:
            live[what] = (size, cat_now, op)
            now[cat_now] += size
        elif what in live:
            n, cat, _ = live.pop(what)
            now[cat] -= n
        else:
            continue  # freed, but allocated before profiling started
        for k, v in now.items():
            own_peak[k] = max(own_peak[k], v)
        total = sum(now.values())
        phase_peak[phase] = max(phase_peak.get(phase, 0), total)
        if total > best:
            best, at_peak, peak_phase = total, dict(now), phase
            top = heapq.nlargest(top_n, live.values())
    return {"peak": best, "at_peak": at_peak, "component_peaks": own_peak, "peak_phase": peak_phase,
            "phase_peaks": phase_peak, "largest_at_peak": [{"bytes": n, "component": c, "op": o} for n, c, o in top]}
