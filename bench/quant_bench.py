"""CPU 4-bit quantization: qlora_kit.quant.cpu against bitsandbytes' own CPU kernel (the same codes, bit for bit,
checked here on every weight timed), on Llama-1.6B-shaped weights and on loading the demo model for training
(`model.load_base`, which quantizes every Linear as it arrives). Interleaved A B A B in one process, OMP threads
set, OMP_WAIT_POLICY=PASSIVE.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python bench/quant_bench.py

Writes bench/results/quant.json and bench/results/quant.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj 2048x2048": (2048, 2048), "k_proj 512x2048": (512, 2048), "up_proj 8192x2048": (8192, 2048),
          "down_proj 2048x8192": (2048, 8192)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    from qlora_kit.quant import bnb as quant, cpu as quant4_cpu
    from qlora_kit.config import ModelConfig, QuantConfig
    from qlora_kit.measure.breakdown import machine_info
    from qlora_kit.model.load import load_base

    code = quant.bnbF.get_4bit_type("nf4", device="cpu")
    g = torch.Generator().manual_seed(0)
    rows = {}
    for label, shape in SHAPES.items():
        W = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        times = {"bitsandbytes": [], "quant4_cpu": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            ref = torch.ops.bitsandbytes.quantize_4bit.default(W, 64, "nf4", torch.uint8)
            times["bitsandbytes"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ours = quant4_cpu.quantize_4bit(W, 64, code)
            times["quant4_cpu"].append(time.perf_counter() - t)
            assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1]), label
        rows[label] = {k: statistics.median(v) for k, v in times.items()}
        print(f"{label:22s} bitsandbytes {rows[label]['bitsandbytes']:.3f} s  "
              f"quant4_cpu {rows[label]['quant4_cpu']:.3f} s",
              flush=True)
    loads = {"bitsandbytes": [], "quant4_cpu": []}
    for _ in range(args.repeats):
        for kind, fast in (("bitsandbytes", False), ("quant4_cpu", True)):
            quant.fast_cpu_quantizer = fast
            t = time.perf_counter()
            load_base(ModelConfig(path=args.model), QuantConfig(type="nf4"))
            loads[kind].append(time.perf_counter() - t)
    quant.fast_cpu_quantizer = True
    load = {k: statistics.median(v) for k, v in loads.items()}
    print(f"load_base {args.model} nf4: bitsandbytes {load['bitsandbytes']:.2f} s  "
          f"quant4_cpu {load['quant4_cpu']:.2f} s")
    m = machine_info()
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} " + " ".join(["python", *sys.argv])
    result = {"command": command, "threads": torch.get_num_threads(),
              "machine": m, "weights": rows, "load_base": load, "load_runs": loads}
    results = Path(args.results)
    (results / "quant.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# CPU NF4 quantization: quant4_cpu vs bitsandbytes' CPU kernel", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, shared with other jobs "
             f"(load average {m.get('loadavg')}). torch threads {torch.get_num_threads()}.",
             f"Command: `{result['command']}` (OMP_WAIT_POLICY=PASSIVE). "
             f"Medians of {args.repeats}, interleaved; the codes "
             "and absmax of every timed weight are asserted identical.", "",
             "| weight (bf16, blocksize 64) | bitsandbytes s | quant4_cpu s | speed-up |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['bitsandbytes']:.3f} | {v['quant4_cpu']:.3f} | {v['bitsandbytes'] / v['quant4_cpu']:.1f}x |"
              for k, v in rows.items()]
    lines += ["", f"Loading {args.model} for training (`model.load_base`, nf4 + double quant): bitsandbytes "
              f"{load['bitsandbytes']:.2f} s, quant4_cpu {load['quant4_cpu']:.2f} s "
              f"({load['bitsandbytes'] / load['quant4_cpu']:.1f}x).", ""]
    (results / "quant.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
