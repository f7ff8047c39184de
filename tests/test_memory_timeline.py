"""The pure replay of a step's allocation events (qlora_kit/memory_timeline.py), on hand-written events whose
peaks are worked out by hand below; the reader of torch's private profiler tree is pinned by
tests/test_memory_measure.py on a real profiled step."""

import matplotlib
import pytest

from qlora_kit.measure.timeline import Event, replay


def alloc(t, ptr, size, op="aten::empty"):
    return Event(t, size, ptr, op=op)


def free(t, ptr, size):
    return Event(t, -size, ptr)


def mark(t, name, ptr=0):
    return Event(t, ptr=ptr, mark=name)


STEP = [  # deliberately out of order: replay sorts by time, a mark before an allocation at the same time
    alloc(10, 0xA, 100),                       # decoder backward: activations 100
    mark(20, "head_start"), alloc(20, 0xB, 400),   # loss head: logits 400 -> total 500 (the peak)
    free(30, 0xB, 400),                        # 100
    mark(40, "head_end"), alloc(50, 0xC, 60),  # back in the decoder: 160
    mark(55, "grad", ptr=0xC),                 # 0xC was an adapter's .grad: activations 100, adapter_grads 60
    free(60, 0xA, 100),                        # 60
    mark(70, "optimizer"), alloc(80, 0xD, 240),    # fp32 master grads: optimizer_state 240 -> 300
    free(90, 0xD, 240), free(95, 0xC, 60),     # 0
    free(99, 0xE, 1000),                       # freed but allocated before profiling: ignored
]


def test_replay_peak_split_and_phases():
    r = replay(list(reversed(STEP)), top_n=2)
    assert r["peak"] == 500 and r["peak_phase"] == "loss_head"
    assert r["at_peak"] == {"adapter_grads": 0, "activations": 100, "logits_and_loss": 400, "optimizer_state": 0}
    assert r["component_peaks"] == {"adapter_grads": 60, "activations": 160, "logits_and_loss": 400,
                                    "optimizer_state": 240}
    assert r["phase_peaks"] == {"decoder_backward": 160, "loss_head": 500, "optimizer_step": 300}
    assert r["largest_at_peak"] == [{"bytes": 400, "component": "logits_and_loss", "op": "aten::empty"},
                                    {"bytes": 100, "component": "activations", "op": "aten::empty"}]


def test_a_grad_mark_moves_bytes_once_and_ignores_unknown_addresses():
    r = replay([alloc(1, 0x1, 50), mark(2, "grad", 0x1), mark(3, "grad", 0x1), mark(4, "grad", 0x99),
                alloc(5, 0x2, 1)])
    assert r["at_peak"] == {"adapter_grads": 50, "activations": 1, "logits_and_loss": 0, "optimizer_state": 0}


@pytest.mark.parametrize("events", [[], [free(1, 0x1, 10)], [mark(1, "head_start")]])
def test_nothing_to_replay(events):
    r = replay(events)
    assert r["peak"] == 0 and r["peak_phase"] is None and r["largest_at_peak"] == []


def test_bench_chart_leaves_matplotlib_global_backend_alone(tmp_path):
    from qlora_kit.measure import report as memory_report

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's choice, which the old chart (matplotlib.use("Agg")) overrode
    row = {"label": "s32 r4 nf4 b2", "device": "cpu", "error": 0.01, "estimate_total": 3 << 20,
           "peak_bytes": 3 << 20, "estimate": {"adapters": 1 << 20, "activations": 2 << 20},
           "at_peak": {"adapters": 1 << 20, "activations": 2 << 20}}
    for k in memory_report.COMPONENTS:
        row["estimate"].setdefault(k, 0)
        row["at_peak"].setdefault(k, 0)
    try:
        memory_report.chart({"model": "tiny", "results": [row]}, tmp_path / "m.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
