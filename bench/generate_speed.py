"""Greedy generation speed on the demo model: today's path vs the CPU fast path (qlora_kit.inference), interleaved.

    .venv/bin/python bench/generate_speed.py [--reps 3] [--new-tokens 64] [--threads 2]

Variants, each timed `reps` times in the order A B C A B C ... within one process, so they share the machine's load:
    quantized   what `generate` did before: nf4 base, weights dequantized inside every matmul, KV cache on
    dense-bf16  dequantized once, bf16 weights (inference.densify)
    fast        inference.for_decoding: dequantized once, whole model fp32 (what `generate` does now on the CPU)
All generate exactly `new_tokens` tokens (min_new_tokens) from the same prompt; tokens/s = new tokens / wall time of
model.generate (prompt prefill included). Writes bench/results/generate_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

PROMPT = "Explain what a Python list comprehension is."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_speed"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from qlora_kit import generate, inference
    from qlora_kit.memory_measure import machine_info

    loaded = generate.load("smollm2-135m")  # nf4, double quant, blocksize 64, bf16 compute: the defaults
    x = torch.tensor([generate.encode(loaded, PROMPT)])
    variants = {"quantized": loaded.model}
    variants["dense-bf16"] = copy.deepcopy(loaded.model)
    inference.densify(variants["dense-bf16"], force=True)
    variants["fast"] = copy.deepcopy(loaded.model)
    what = inference.for_decoding(variants["fast"])
    times: dict[str, list[float]] = {k: [] for k in variants}
    texts = {}
    for rep in range(args.reps):
        for name, model in variants.items():
            t = time.perf_counter()
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            times[name].append(time.perf_counter() - t)
            texts[name] = loaded.tokenizer.decode(y[0, x.shape[1]:])
            print(f"rep {rep} {name}: {args.new_tokens / times[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    base = statistics.median(times["quantized"])
    rows = [{"variant": k, "median_s": round(statistics.median(v), 3), "tokens_per_s": round(args.new_tokens /
             statistics.median(v), 2), "speedup": round(base / statistics.median(v), 2),
             "runs_s": [round(t, 3) for t in v]} for k, v in times.items()]
    doc = {"model": "smollm2-135m", "prompt": PROMPT, "prompt_tokens": x.shape[1], "new_tokens": args.new_tokens,
           "threads": args.threads, "fast_path": what, "machine": machine_info(), "rows": rows,
           "same_text_as_quantized": {k: texts[k] == texts["quantized"] for k in texts},
           "command": "bench/generate_speed.py " + " ".join(sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    m = doc["machine"]
    lines = ["# Greedy generation speed, demo model (smollm2-135m, nf4 base)", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, shared with other jobs (load average at the "
             f"end {m.get('loadavg', '?')}); {args.threads} threads. Command: `.venv/bin/python {doc['command']}`.",
             f"{args.new_tokens} new tokens after a {x.shape[1]}-token prompt, greedy, KV cache on; variants interleaved "
             f"({args.reps} runs each), median.", "",
             "| variant | tokens/s | speedup vs quantized | same text as quantized |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']} | {r['speedup']}x | {doc['same_text_as_quantized'][r['variant']]} |"
              for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
