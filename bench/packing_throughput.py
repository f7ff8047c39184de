"""Packing's throughput gain: non-pad tokens per second of a training step, unpacked vs packed
(position ids restarting per document, block-diagonal attention), on the demo model.

    python bench/packing_throughput.py --out bench/results        (writes packing.json / packing.md)

Two data sets: the demo data (recipes/data/facts.jsonl, short alpaca records) and a long/short mix generated here
(seeded: 70% short answers of 5-30 words, 30% long ones of 60-180 words; chat-formatted through the same alpaca
template). One model is loaded once; both variants step it with lr=0 (the whole step runs, optimizer included,
but the weights never change) and alternate step by step, so machine load hits both alike. Reported: the ratio of
non-pad tokens/s, packed over unpacked, and the share of pad tokens each variant computes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("the river city north capital old market bridge winter stone light harbor green quiet road tower "
         "garden island song bread school train music paper window").split()


def mixed_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.randint(60, 180) if rng.random() < 0.3 else rng.randint(5, 30)
        answer = " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."
        out.append({"instruction": f"Describe place number {i} in a few words.", "output": answer})
    return out


def measure(p, train_mod, data_mod, datasets: dict, batch: int, warmup: int, steps: int) -> dict:
    pad = data_mod.pad_token_id(p.tokenizer)
    streams = {k: data_mod.BatchStream(v.train, batch, 0, pad) for k, v in datasets.items()}
    stats = {k: {"tokens": 0, "slots": 0, "seconds": 0.0, "steps": 0} for k in datasets}
    for i in range(warmup + steps):
        for name, stream in streams.items():  # interleaved: A, B, A, B, ...
            b = stream.next_batch()
            t0 = time.perf_counter()
            res = train_mod.train_step(p, [b], lr=0.0, max_grad_norm=1.0)
            dt = time.perf_counter() - t0
            if i >= warmup:
                s = stats[name]
                s["tokens"] += res.tokens
                s["slots"] += b["input_ids"].numel()
                s["seconds"] += dt
                s["steps"] += 1
    for s in stats.values():
        s["tokens_per_s"] = round(s["tokens"] / s["seconds"], 1)
        s["pad_share"] = round(1 - s["tokens"] / s["slots"], 3)
        s["seconds"] = round(s["seconds"], 2)
    stats["gain"] = round(stats["packed"]["tokens_per_s"] / stats["unpacked"]["tokens_per_s"], 2)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import dataclasses

    from qlora_kit.train import loop as train
    from qlora_kit.data import pipeline as data
    from qlora_kit.config import load_recipe
    from qlora_kit.measure.breakdown import machine_info

    recipe = load_recipe(HERE.parent / "recipes" / "demo.yaml", ["data.val_fraction=0", "train.device=cpu"])
    p = train.prepare(recipe)
    mixed_path = args.out / "packing_mixed.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    mixed_path.write_text("".join(json.dumps(r) + "\n" for r in mixed_records(200)))
    sets = {"demo (facts.jsonl, max_length 128)": (recipe.data, 4),
            "long/short mix (200 records, max_length 256)": (dataclasses.replace(recipe.data, path=str(mixed_path),
                                                                                 max_length=256), 4)}
    results = {}
    try:
        for name, (cfg, batch) in sets.items():
            built = {"unpacked": data.build(cfg, p.tokenizer, 0),
                     "packed": data.build(dataclasses.replace(cfg, packing=True), p.tokenizer, 0)}
            results[name] = measure(p, train, data, built, batch, args.warmup, args.steps)
            results[name]["examples"] = len(built["unpacked"].train)
            results[name]["packed_rows"] = len(built["packed"].train)
            print(name, json.dumps(results[name]), file=sys.stderr)
    finally:
        mixed_path.unlink()
    command = "python bench/packing_throughput.py " + " ".join(sys.argv[1:])
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command.strip(),
           "machine": machine_info(), "model": "smollm2-135m nf4, LoRA r=16 all-linear, batch 4, bf16 compute",
           "results": results}
    (args.out / "packing.json").write_text(json.dumps(out, indent=1) + "\n")
    m = out["machine"]
    lines = [f"# Packing throughput: non-pad tokens/s of a training step, packed vs unpacked ({out['model']})", "",
             f"{out['date']}. Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB, load average "
             f"{m['loadavg']} (shared with other jobs). Command: `{out['command']}`. {args.steps} timed steps per "
             "variant after warm-up, the two variants interleaved step by step.", "",
             "| data | variant | rows | pad share | non-pad tokens/s | gain |", "|---|---|--:|--:|--:|--:|"]
    for name, r in results.items():
        for v in ("unpacked", "packed"):
            rows = r["examples"] if v == "unpacked" else r["packed_rows"]
            gain = f"{r['gain']:.2f}x" if v == "packed" else "1.00x"
            lines.append(f"| {name} | {v} | {rows} | {r[v]['pad_share']:.1%} | {r[v]['tokens_per_s']:,.0f} | {gain} |")
    (args.out / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
