"""Long context: CPU step time with tiled MLP + replayed dropout vs today's path, interleaved.

    OMP_NUM_THREADS=1 python bench/long_context_step_time.py --seq 2048 --steps 4 --threads 1 --out bench/results

smollm2-135m, batch 1, LoRA r=16 on every Linear, dropout 0.05. One process holds the prepared models: A = the path
without the long-context options (mlp_chunk 0, LoRA dropout as nn.Dropout: LoRALinear.replay_dropout = False,
transformers' own RMSNorm) and B = every long-context option but offload (tiled MLP --mlp-chunk, dropout_replay,
lean norms); with --variants also C = tiled MLP only, D = dropout_replay only, E = lean norms only, to find where a
cost comes from.
Steps alternate A B (C D E) A B ... after one warm-up step each, so load from other jobs on a shared machine falls
on all alike; the result is the ratio of the medians (B / A), and of each other path to A.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per path (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mlp-chunk", type=int, default=1024)
    ap.add_argument("--variants", default="AB", help="which paths to run, e.g. AB or ABCDE")
    args = ap.parse_args()
    import torch

    from qlora_kit.train import loop as train
    from qlora_kit.lowmem import lean_norm
    from qlora_kit.adapters.lora import LoRALinear
    from qlora_kit.measure.breakdown import MeasureConfig, machine_info, recipe_for, synthetic_batch
    from qlora_kit.model.load import resolve

    c = args.mlp_chunk
    every = {"A": ("A: before (no tiling, nn.Dropout copies, fp32-saving norms)", 0, False, False),
             "B": (f"B: tiled MLP {c} + dropout_replay + lean norms", c, True, True),
             "C": (f"C: tiled MLP {c} only", c, False, False),
             "D": ("D: dropout_replay only", 0, True, False),
             "E": ("E: lean norms only", 0, False, True)}
    paths = {every[v][0]: every[v][1:] for v in args.variants}  # name -> (mlp_chunk, replay, lean)
    prepared = {}
    with TemporaryDirectory() as tmp:
        data = Path(tmp) / "one.jsonl"
        data.write_text(json.dumps({"text": "step time"}) + "\n")
        for name, (chunk, _, lean) in paths.items():
            cfg = MeasureConfig(seq=args.seq, batch=1, threads=args.threads, mlp_chunk=chunk)
            prepared[name] = train.prepare(recipe_for(cfg, data))
            if not lean:
                lean_norm.make_plain(prepared[name].model)
    config = json.loads((resolve(MeasureConfig.model) / "config.json").read_text())
    batch = synthetic_batch(config["vocab_size"], 1, args.seq, 0)
    times = {name: [] for name in paths}
    losses = {name: [] for name in paths}
    for i in range(args.steps + 1):
        for name, (_, replay, _) in paths.items():
            LoRALinear.replay_dropout = replay  # read at every forward: the class switch picks the dropout path
            t0 = time.perf_counter()
            r = train.train_step(prepared[name], [batch], lr=1e-4, max_grad_norm=1.0)
            dt = time.perf_counter() - t0
            losses[name].append(round(r.loss, 4))
            if i:  # the first step of each builds the optimizer state: not timed
                times[name].append(round(dt, 3))
            print(f"step {i} {name}: {dt:.2f} s", file=sys.stderr)
    medians = {n: statistics.median(times[n]) for n in paths}
    a = medians[every["A"][0]]
    doc = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info(),
           "command": "python bench/long_context_step_time.py " + " ".join(sys.argv[1:]),
           "torch_threads": torch.get_num_threads(), "seq": args.seq, "batch": 1, "rank": 16, "dropout": 0.05,
           "step_s": times, "loss": losses, "median_s": medians,
           "ratio_to_a": {n: round(m / a, 4) for n, m in medians.items()},
           "ratio_b_over_a": round(medians[every["B"][0]] / a, 4), "target": "B / A <= 1.10",
           "pair_ratios_b_over_a": [round(b / x, 4) for x, b in zip(times[every["A"][0]], times[every["B"][0]])]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context_step_time.json").write_text(json.dumps(doc, indent=1) + "\n")
    m = doc["machine"]
    lines = ["# Long context: CPU step time, tiled MLP + dropout without copies + lean norms vs the path before "
             "(interleaved)", "",
             f"{doc['date']}. Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, load "
             f"average {m['loadavg']} (shared with other jobs). torch threads {doc['torch_threads']}. Command: "
             f"`OMP_NUM_THREADS={args.threads} {doc['command']}`. smollm2-135m, batch 1, seq {args.seq}, r=16 "
             "all-linear, dropout 0.05; steps alternate between the paths after one untimed step each.", "",
             "| path | step times (s) | median (s) | / A |", "|---|---|--:|--:|"]
    for name in paths:
        lines.append(f"| {name} | {', '.join(map(str, times[name]))} | {medians[name]:.3f} | "
                     f"{doc['ratio_to_a'][name]:.3f} |")
    lines += ["", f"Ratio B / A (medians): **{doc['ratio_b_over_a']:.3f}** (target <= 1.10: "
              f"{'met' if doc['ratio_b_over_a'] <= 1.10 else 'NOT met'}); per pair: "
              f"{', '.join(map(str, doc['pair_ratios_b_over_a']))}."]
    (out / "long_context_step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
