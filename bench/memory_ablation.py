"""Each memory technique measured on its own: qlora-kit's default step, then the same step with one
technique switched off, each in its own process on the demo model.

    python bench/memory_ablation.py --out bench/results          (writes memory_ablation.json / .md)

Measured = bytes of live tensors at the step's worst moment (qlora_kit.measure.breakdown: the CPU analogue of
max_memory_allocated) and the RSS peak of an unprofiled step. 'naive dequantized linear' replaces QuantLinear's
forward by F.linear(x, dequantize(W)), which makes autograd keep the dequantized (out, in) weight for backward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = [  # (name, recipe overrides, extra)
    ("qlora-kit default", "", ""),
    ("frozen weights up-cast to fp32 (model.dtype=fp32)", "model.dtype=fp32", ""),
    ("fp32 adapters and matmuls (quant.compute_dtype=fp32)", "quant.compute_dtype=fp32", ""),
    ("no activation checkpointing", "train.gradient_checkpointing=false", ""),
    ("unchunked cross-entropy (one chunk)", "train.loss_chunk=1000000", ""),
    ("naive dequantized linear (W saved for backward)", "", "naive"),
    ("naive linear, no checkpointing", "train.gradient_checkpointing=false", "naive"),
]


def child(overrides: str, extra: str, seq: int, batch: int) -> dict:
    from qlora_kit.measure import breakdown as memory_measure

    if extra == "naive":
        import torch.nn.functional as F

        from qlora_kit.quant.bnb import QuantLinear

        def naive(self, x):  # what a straightforward implementation does: autograd saves W for grad_x
            return F.linear(x.to(self.spec.compute_dtype), self.dequantize()).to(x.dtype)

        QuantLinear.forward = naive
    return memory_measure.measure(memory_measure.MeasureConfig(seq=seq, batch=batch, overrides=overrides, steps=3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.seq, args.batch)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1"}
    rows = []
    for i, (name, overrides, extra) in enumerate(VARIANTS, 1):
        out = subprocess.run([sys.executable, __file__, "--seq", str(args.seq), "--batch", str(args.batch),
                              "--child", overrides, extra], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"variant": name, "overrides": overrides, "extra": extra, "peak_bytes": r["peak_bytes"],
                     "peak_phase": r["peak_phase"], "rss_step_peak": r["rss"]["step_peak"],
                     "tokens_per_s": r["tokens_per_s"], "at_peak": r["at_peak"]})
        print(f"[{i}/{len(VARIANTS)}] {name}: live {r['peak_bytes'] / 2**20:,.1f} MiB, "
              f"RSS {r['rss']['step_peak'] / 2**20:,.0f} MiB, {r['tokens_per_s']} tok/s", file=sys.stderr)
    from qlora_kit.measure.breakdown import machine_info

    base = rows[0]
    command = f"python bench/memory_ablation.py --seq {args.seq} --batch {args.batch} --out {args.out}"
    result = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "model": "smollm2-135m", "seq": args.seq, "batch": args.batch, "rows": rows}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "memory_ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    lines = [f"# Memory techniques measured one at a time (smollm2-135m, batch {args.batch} x seq {args.seq}, "
             "r=16 all linear, nf4)", "",
             f"{result['date']}. Machine: {m['cpu']}, {m['cores']} cores, load average {m['loadavg']}. "
             f"Command: `{command}`.", "",
             "Each row switches ONE technique off (or on, for the naive linear) against the default; each ran in its "
             "own process. Live = bytes of live tensors at the step's worst moment; RSS = peak of an unprofiled step.",
             "", "| variant | live tensors at peak | vs default | peak phase | step RSS peak | tokens/s |",
             "|---|--:|--:|---|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['peak_bytes'] / 2**20:,.1f} MiB "
                     f"| {r['peak_bytes'] / base['peak_bytes']:.2f}x "
                     f"| {r['peak_phase']} | {r['rss_step_peak'] / 2**20:,.0f} MiB | {r['tokens_per_s']:,.0f} |")
    (outdir / "memory_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
