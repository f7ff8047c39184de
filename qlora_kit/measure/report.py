"""`qlora-kit bench memory`'s report: a markdown table (predicted vs measured, per component) and a PNG chart.

The chart is built on `matplotlib.figure.Figure` with an Agg canvas (the `plot` extra), never pyplot: no global
backend is set, so a caller's own matplotlib setup is untouched.
"""

from __future__ import annotations

from pathlib import Path

from .. import atomic
from .grid import label
from ..estimate.analytic import COMPONENTS


def mib(n: int | float) -> str:
    v = n / 2**20
    return f"{v:,.1f}" if v >= 10 else f"{v:.3f}"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    ok = [r for r in doc["results"] if "failed" not in r]
    lines = [
        "# `qlora-kit bench memory`", "",
        f"Model `{doc['model']}`, {doc['date']}. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['ram_bytes'] / 2**30:.1f} GiB RAM; load average before/after {m['loadavg']} / {doc['loadavg_after']}"
        f"{' (shared, noisy machine)' if max(m['loadavg'][0], doc['loadavg_after'][0]) > 1 else ''}.", "",
        f"Command: `{doc['command']}`", "",
        "**Measured** = bytes held by live tensors at the step's worst moment (static tensors + the peak of one "
        "steady step's allocations, from the allocator's events under `torch.profiler(profile_memory=True)`): the "
        "CPU analogue of CUDA's `max_memory_allocated`, and what the estimate is checked against (target: within "
        "10%). RSS also holds the interpreter, libraries and the allocator's cache; it is shown for reference "
        "(step peak: VmHWM over an unprofiled step). Sizes in MiB.", "",
        "| configuration | predicted | measured | error | peak phase: predicted / measured | offloaded to host: "
        "predicted / measured | RSS after imports / after load / step peak | tokens/s |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in ok:
        rss = r["rss"]
        step = mib(rss["step_peak"]) if rss["step_peak"] else "-"
        offloaded = r.get("host", {}).get("offloaded_activations", 0)  # train.offload_activations: host memory
        predicted = r.get("estimate_host", {}).get("offloaded_activations", 0)
        host = f"{mib(predicted)} / {mib(offloaded)}" if offloaded or predicted else "-"
        lines.append(f"| {r['label']} | {mib(r['estimate_total'])} | {mib(r['peak_bytes'])} | {r['error']:+.1%} | "
                     f"{r['estimate_phase']} / {r['peak_phase']} | {host} | {mib(rss['after_imports'])} / "
                     f"{mib(rss['after_load'])} / {step} | {r['tokens_per_s']:,.0f} |")
    for r in doc["results"]:
        if "failed" in r:
            lines.append(f"| {label(r['config'])} | failed: {r['failed']} | | | | | | |")
    if any(r["device"] == "cpu" for r in ok):
        lines += ["", "On the CPU the estimate runs with `--device cpu`: no CUDA context allowance; LoRA dropout keeps "
                  "a 1-byte bool mask per adapter (on CUDA the RNG state, the mask drawn again in backward); "
                  "attention is SDPA's CPU kernel; a 4-bit Linear whose "
                  "in_features is not a multiple of the blocksize is dequantized in plain torch (int64 codes + fp32 "
                  "values live at once: a `dequant_workspace` term). The peak phase is where the step's worst moment "
                  "falls: the loss head (one chunk of fp32 logits and two gradients of the same size), the decoder "
                  "backward (layer inputs + one recomputed layer) or the optimizer step."]
    if ok:
        lines += ["", "Per component at the peak moment, predicted / measured (MiB):", "",
                  "| component | " + " | ".join(r["label"] for r in ok) + " |",
                  "|---|" + "---:|" * len(ok)]
        keys = [k for k in COMPONENTS if any(r["estimate"][k] or r["at_peak"][k] for r in ok)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{mib(r['estimate'][k])} / {mib(r['at_peak'][k])}" for r in ok)
                         + " |")
        lines.append("| **total** | " + " | ".join(f"**{mib(r['estimate_total'])} / {mib(r['peak_bytes'])}**"
                                                  for r in ok) + " |")
        lines += ["", "Each component's own maximum over the step, predicted / measured (MiB; they peak at "
                  "different moments, so these do not add up to the peak):", "",
                  "| component | " + " | ".join(r["label"] for r in ok) + " |", "|---|" + "---:|" * len(ok)]
        for k in ("adapter_grads", "activations", "logits_and_loss"):
            lines.append(f"| {k} | " + " | ".join(
                f"{mib(r['estimate_sizes'][k])} / {mib(r['component_peaks'][k])}" for r in ok) + " |")
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in doc["results"] if "failed" not in r]
    keys = [k for k in COMPONENTS if any(r["estimate"][k] or r["at_peak"][k] for r in ok)]
    colors = dict(zip(COMPONENTS, colormaps["tab10"].colors))
    fig = Figure(figsize=(max(6.0, 1.6 * len(ok) + 2), 5.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.38
    for i, r in enumerate(ok):
        for dx, src, hatch in ((-width / 2, r["estimate"], ""), (width / 2, r["at_peak"], "//")):
            bottom = 0.0
            for k in keys:
                v = src[k] / 2**20
                ax.bar(i + dx, v, width, bottom=bottom, color=colors[k], hatch=hatch, edgecolor="white",
                       label=k if i == 0 and dx < 0 else None)
                bottom += v
        ax.text(i, max(r["estimate_total"], r["peak_bytes"]) / 2**20, f"{r['error']:+.1%}", ha="center",
                va="bottom", fontsize=8)
    ticks = [" ".join(r["label"].split()[:4]) + "".join("\n" + x for x in r["label"].split()[4:]) for r in ok]
    ax.set_xticks(range(len(ok)), [t + "\npredicted | measured" for t in ticks], fontsize=7)
    ax.set_ylim(0, 1.12 * max(max(r["estimate_total"], r["peak_bytes"]) for r in ok) / 2**20)
    ax.set_ylabel("MiB at the step's peak")
    ax.set_title(f"qlora-kit bench memory: {doc['model']} ({ok[0]['device'] if ok else ''})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write(doc: dict, out: Path) -> list[str]:
    """memory.json, memory.md and (when something was measured) memory.png in `out`, each written atomically."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "memory.json", json.dumps(doc, indent=1) + "\n")
    atomic.write_text(out / "memory.md", markdown(doc))
    names = ["memory.md", "memory.json"]
    if any("failed" not in r for r in doc["results"]):
        chart(doc, out / "memory.png")
        names.append("memory.png")
    return names
