"""Several processes on one machine: per-rank memory of DDP vs FSDP vs one process, and tokens/s of
2 ranks x 1 thread vs 1 process x 2 threads, on the demo model (SmolLM2-135M, nf4), the same global batch.

    python bench/distributed_bench.py --out bench/results          (writes distributed.json / distributed.md)

Each variant is a real `qlora-kit train` run (torchrun for 2 ranks), interleaved over --repeats rounds. Read from
each run's summary.json (rank 0 gathers every rank's numbers):
    frozen bytes per rank   bytes of the frozen tensors the rank stores: quantized codes + constants, and the
                            16-bit embeddings/norms/lm_head (a sharded tensor counts its local shard)
    peak RSS per rank       ru_maxrss of the rank's process (includes torch/transformers and loading)
    tokens/s                non-pad tokens of the whole global step / loop wall time (all ranks together)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = [  # name, processes, threads per process, per-process batch, train.parallel
    ("1 process x 2 threads", 1, 2, 4, "auto"),
    ("2 ranks x 1 thread, ddp", 2, 1, 2, "ddp"),
    ("2 ranks x 1 thread, fsdp", 2, 1, 2, "fsdp"),
]


def run_variant(name: str, procs: int, threads: int, batch: int, parallel: str, steps: int, folder: Path) -> dict:
    out = folder / name.replace(" ", "_").replace(",", "")
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"train.steps={steps}", f"train.batch_size={batch}", f"train.parallel={parallel}", "train.save_every=0",
            "train.eval_every=0", "data.val_fraction=0", f"train.num_threads={threads}", "train.device=cpu"]
    args = ["train", str(ROOT / "recipes" / "demo.yaml"), "--out", str(out), "--no-progress",
            *[a for s in sets for a in ("--set", s)]]
    launch = [sys.executable, "-m", "qlora_kit.cli.main"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
         "qlora_kit.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([*launch, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    if procs == 1:  # one process: its own numbers, in the shape of the multi-rank list
        ranks = [{"rank": 0, "peak_memory_bytes": summary["peak_memory_bytes"], "frozen_bytes": None}]
    else:
        ranks = summary["ranks"]
    return {"variant": name, "processes": procs, "threads": threads, "batch_per_process": batch,
            "tokens_per_s": summary["tokens_per_s"], "final_loss": summary["final_loss"], "ranks": ranks}


def frozen_one_process() -> dict:
    """The frozen bytes of the demo model in one process (what each FSDP rank should hold about half of)."""
    from qlora_kit.config import load_recipe
    from qlora_kit.train.fsdp import local_frozen_bytes
    from qlora_kit.model.load import load_base

    r = load_recipe(ROOT / "recipes" / "demo.yaml")
    return local_frozen_bytes(load_base(r.model, r.quant)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--table", type=Path, help="only re-render the markdown of an existing distributed.json")
    args = ap.parse_args()
    if args.table:
        (args.out / "distributed.md").write_text(table(json.loads(args.table.read_text())))
        return
    from qlora_kit.measure.breakdown import machine_info

    whole = frozen_one_process()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):  # interleaved: every variant once per round
            for v in VARIANTS:
                r = run_variant(*v, args.steps, Path(tmp))
                r["round"] = rep
                rows.append(r)
                print(f"round {rep}: {r['variant']}: {r['tokens_per_s']} tokens/s, "
                      f"RSS {[x['peak_memory_bytes'] >> 20 for x in r['ranks']]} MiB", flush=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "steps": args.steps, "model": "smollm2-135m (recipes/demo.yaml, nf4)",
              "frozen_bytes_one_process": whole, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "distributed.md").write_text(table(result))
    print(table(result))


def table(result: dict) -> str:
    whole = result["frozen_bytes_one_process"]
    m = result["machine"]
    lines = [f"# Several processes on one machine ({result['model']}, {result['steps']} steps, global batch 4)",
             "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB, shared with other jobs "
             f"(load average at the end {m['loadavg']}). Command: `python bench/distributed_bench.py`.", "",
             "| variant | tokens/s (each round) | peak RSS per rank (MiB) | quantized bytes per rank "
             "(vs one process) | other frozen bytes per rank (vs one process) |", "|---|--:|--:|--:|--:|"]
    for name, *_ in VARIANTS:
        runs = [r for r in result["runs"] if r["variant"] == name]
        tps = " / ".join(f"{r['tokens_per_s']:,.1f}" for r in runs)
        rss = "/".join(str(max(r["ranks"][i]["peak_memory_bytes"] for r in runs) >> 20)
                       for i in range(len(runs[0]["ranks"])))
        fb = runs[0]["ranks"][0]["frozen_bytes"] or whole
        q = f"{fb['quantized'] / 2**20:.1f} MiB ({fb['quantized'] / whole['quantized']:.2f}x)"
        o = f"{fb['other_frozen'] / 2**20:.1f} MiB ({fb['other_frozen'] / whole['other_frozen']:.2f}x)"
        lines.append(f"| {name} | {tps} | {rss} | {q} | {o} |")
    lines += ["", "Frozen bytes of rank 0 (rank 1 holds the same within shard padding). RSS includes the Python, "
              "torch and transformers runtime of each process (~0.4 GiB), so it moves less than the stored bytes. "
              "On 2 cores, 2 ranks x 1 thread and 1 process x 2 threads compete for the same cores: the ratio says "
              "what the all-reduce and the per-rank overheads cost, not what a second GPU would give. "
              "Not measured: the "
              "live-tensor peak per rank (memory_measure's profiler replay is single-process)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
