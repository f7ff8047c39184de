"""The transient memory of one profiled training step: allocation events in time order, replayed.

Two parts, kept apart on purpose:
- `read_events(prof, device_type)` is the ONLY code that touches torch's private profiler API
  (`torch._C._profiler._EventType`, `experimental_event_tree()`, the tree torch's own memory profiler reads);
  it turns the tree into plain `Event`s. tests/test_memory_measure.py pins it on a real profiled step.
- `replay(events)` is pure: it walks the events in order, tags each allocation with the component of the phase
  it was made in (decoder backward, loss head, optimizer step) or as an adapter gradient, and returns the split
  at the transient peak. tests/test_memory_timeline.py checks it on hand-written events.

Marks are `record_function` ranges named `MARK + name`; their start time counts. memory_measure's hooks place
zero-length ones: `head_start` / `head_end` around the loss head, `grad` (with the gradient's address) when
autograd accumulates an adapter's gradient; `train.train_step` runs its optimizer part inside `optimizer`, so
what is allocated from there on (fp32 gradients on the masters, AdamW temporaries) is optimizer state;
train.preference runs its no-grad passes (reference, kto's mismatched pairs) inside `reference`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..terms import PROFILER_MARK as MARK

TRANSIENT = ("adapter_grads", "activations", "logits_and_loss", "optimizer_state")
# mark -> (phase, the component of what is allocated from there on)
PHASES = {"head_start": ("loss_head", "logits_and_loss"), "head_end": ("decoder_backward", "activations"),
          "optimizer": ("optimizer_step", "optimizer_state"), "forward": ("decoder_backward", "activations"),
          "reference": ("reference_pass", "activations")}


@dataclass(frozen=True)
class Event:
    time_ns: int
    size: int = 0
    """Bytes: > 0 an allocation, < 0 a free, 0 a mark."""
    ptr: int = 0
    """Address of the allocation or free; for a `grad` mark, the address of the gradient's storage."""
    mark: str = ""
    """head_start | head_end | optimizer | grad, or "" for an allocation or a free."""
    op: str = ""
    """The op that allocated (for the largest-tensors list)."""


def read_events(prof, device_type: str) -> list[Event]:
    """Allocations and frees on `device_type`, and our marks, from a finished
    `torch.profiler.profile(profile_memory=True)`."""
    from torch._C._profiler import _EventType  # private: the profiler's event tree (allocation ptr, size, time)

    events, stack = [], list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:  # depth first, in the tree's order
        n = stack.pop()
        if n.tag == _EventType.Allocation and n.extra_fields.device.type == device_type:
            f = n.extra_fields
            events.append(Event(n.start_time_ns, f.alloc_size, f.ptr, op=n.parent.name if n.parent else ""))
        elif n.name.startswith(MARK):
            name, _, ptr = n.name[len(MARK):].partition("::")
            events.append(Event(n.start_time_ns, ptr=int(ptr or 0), mark=name))
        stack.extend(reversed(n.children))
    return events


def replay(events: list[Event], top_n: int = 8) -> dict:
    """Replay allocations and frees in time order (a mark before an allocation at the same time); return the
    transient peak, its split by component, each component's own peak, the peak per phase, and the largest
    tensors live at the peak. A free of memory allocated before the events began is ignored."""
    events = sorted(events, key=lambda e: (e.time_ns, e.size != 0))
    phase, component = "decoder_backward", "activations"
    live: dict[int, tuple[int, str, str]] = {}  # ptr -> (bytes, component, op)
    now = dict.fromkeys(TRANSIENT, 0)
    best, at_peak, own_peak, top, phase_peak, peak_phase = 0, dict(now), dict(now), [], {}, None
    for e in events:
        if e.mark:
            if e.mark in PHASES:
                phase, component = PHASES[e.mark]
            elif e.mark == "grad" and e.ptr in live and live[e.ptr][1] != "adapter_grads":
                n, cat, op = live[e.ptr]  # this allocation turned out to be an adapter's .grad
                now[cat] -= n
                now["adapter_grads"] += n
                live[e.ptr] = (n, "adapter_grads", op)
            continue
        if e.size > 0:
            live[e.ptr] = (e.size, component, e.op)
            now[component] += e.size
        elif e.ptr in live:
            n, cat, _ = live.pop(e.ptr)
            now[cat] -= n
        else:
            continue
        for k, v in now.items():
            own_peak[k] = max(own_peak[k], v)
        total = sum(now.values())
        phase_peak[phase] = max(phase_peak.get(phase, 0), total)
        if total > best:
            best, at_peak, peak_phase = total, dict(now), phase
            top = heapq.nlargest(top_n, live.values())
    return {"peak": best, "at_peak": at_peak, "component_peaks": own_peak, "peak_phase": peak_phase,
            "phase_peaks": phase_peak, "largest_at_peak": [{"bytes": n, "component": c, "op": o} for n, c, o in top]}
