"""CPU RSS beyond live tensors: glibc malloc settings against peak RSS growth and tokens/s.

Each variant runs `python -m qlora_kit.measure.breakdown --json --seq 2048 --batch 1 --steps 3 --threads 2` (the demo
model, r=16 all-linear) in its own process with the variant's environment, rounds alternating A B C ... A B C:

    flock /tmp/timing.lock python bench/rss_allocator.py --rounds 2 --runs /tmp/rssruns
    python bench/rss_allocator.py --runs /tmp/rssruns --no-run        # tables from run files already there

Run files are `<variant>_<round>.json`. Writes bench/results/rss_allocator.{json,md}. Growth = RSS at the step's
peak (VmHWM over a step) minus RSS after imports; live = the live-tensor peak of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "A": ("glibc defaults", {}),
    "B": ("mmap threshold 128 KiB, trim 128 KiB",
          {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}),
    "H": ("B + transparent huge pages for malloc",
          {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    "G": ("mmap threshold 1 MiB, trim 128 KiB",
          {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "131072"}),
    "D": ("mmap threshold 4 MiB, trim 4 MiB",
          {"MALLOC_MMAP_THRESHOLD_": "4194304", "MALLOC_TRIM_THRESHOLD_": "4194304"}),
    "E": ("mmap threshold 32 MiB, trim 128 KiB",
          {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "131072"}),
    "F": ("one malloc arena", {"MALLOC_ARENA_MAX": "1"}),
    "T": ("transparent huge pages for malloc only", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    "K": ("recipe switch train.return_freed_memory: true", {}),  # mallopt at prepare(), no environment
}
ARGS = {"K": ["--overrides", "train.return_freed_memory=true"]}
COMMAND = ["-m", "qlora_kit.measure.breakdown", "--json", "--seq", "2048", "--batch", "1", "--steps", "3",
           "--threads", "2"]


def run(runs: Path, rounds: int, keys: list[str]) -> None:
    env0 = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    for r in range(1, rounds + 1):
        for k in keys:
            out = subprocess.run([sys.executable, *COMMAND, *ARGS.get(k, [])], env={**env0, **VARIANTS[k][1]},
                                 capture_output=True, text=True, check=True).stdout
            (runs / f"{k}_{r}.json").write_text(out)
            print(k, r, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="ABHGDEFTK")
    p.add_argument("--no-run", action="store_true")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    if not args.no_run:
        run(args.runs, args.rounds, list(args.variants))
    from qlora_kit.measure.breakdown import machine_info

    rows = {}
    for k in args.variants:
        files = sorted(args.runs.glob(f"{k}_*.json"))
        if not files:
            continue
        runs = [json.loads(f.read_text()) for f in files]
        growth = [(d["rss"]["step_peak"] - d["rss"]["after_imports"]) / 2**20 for d in runs]
        live = [d["peak_bytes"] / 2**20 for d in runs]
        rows[k] = {"label": VARIANTS[k][0], "env": VARIANTS[k][1], "options": ARGS.get(k, []), "runs": len(runs),
                   "tokens_per_s": [d["tokens_per_s"] for d in runs], "growth_mib": growth, "live_mib": live,
                   "ratio": statistics.median(g / v for g, v in zip(growth, live))}
    base = statistics.median(rows["A"]["tokens_per_s"])
    m = machine_info()
    result = {"command": "python " + " ".join(COMMAND) + " (one process per run, variant environment)",
              "machine": m, "variants": rows}
    (args.results / "rss_allocator.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# CPU RSS beyond live tensors: glibc malloc settings", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM (quiet: timing lock held, "
             f"other work at nice 19). Each run: `OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE {result['command']}`; "
             "smollm2-135m, seq 2048, batch 1, r=16 all-linear; variants alternated within each round.", "",
             "| variant | environment (or options) | runs | tokens/s (each) | vs defaults "
             "| RSS growth after imports -> step peak (MiB) "
             "| live-tensor peak (MiB) | growth / live |", "|---|---|--:|---|--:|---|--:|--:|"]
    for r in rows.values():
        env = " ".join([*(f"{a}={b}" for a, b in r["env"].items()), *r["options"]]) or "-"
        tps = statistics.median(r["tokens_per_s"])
        lines.append(f"| {r['label']} | `{env}` | {r['runs']} | {' / '.join(f'{t:.1f}' for t in r['tokens_per_s'])} "
                     f"| {tps / base:.2f}x | {' / '.join(f'{g:.0f}' for g in r['growth_mib'])} "
                     f"| {r['live_mib'][0]:.0f} "
                     f"| {r['ratio']:.2f}x |")
    (args.results / "rss_allocator.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
