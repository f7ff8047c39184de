"""Long context: the longest sequence the estimate fits on a GPU with each option, and the measured
device-resident bytes per extra token on the CPU (demo model), with the options off and on.

    python bench/long_context.py --out bench/results                 # estimates + CPU measurements (minutes)
    python bench/long_context.py --estimates-only --out bench/results

Estimates: batch 1, LoRA r=16 on every Linear, dropout 0.05, nf4 + double quant, bf16, AdamW, CUDA (with the
0.5 GiB context allowance), max_position_embeddings lifted so the bisection is not capped. Measurements:
`python -m qlora_kit.measure.breakdown` (live tensors at the step's peak; the offload store's host buffers apart), one
process per configuration, seq 1024 and 4096, batch 1; slope = (peak(4096) - peak(1024)) / 3072 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA3_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072, "tie_word_embeddings": False}
PEERS = {  # published figures, batch 1: Unsloth (r=32), HF + FA2
    ("llama-3.1-8b", 24): {"unsloth": 78475, "hf_fa2": 5789},
    ("llama-3-70b", 80): {"unsloth": 89389, "hf_fa2": 6916},
}
OPTIONS = {  # name -> EstimateConfig fields / memory_measure flags
    "before (nn.Dropout copies, no options)": {"replay_dropout": False},
    "replayed dropout": {},
    "replayed dropout + tiled MLP 1024": {"mlp_chunk": 1024},
    "replayed dropout + tiled MLP 1024 + offload": {"mlp_chunk": 1024, "offload_activations": True},
}


def longest(config: dict, cfg, gib: int) -> int:
    from qlora_kit.estimate import analytic as me

    def fits(seq: int) -> bool:
        return me.estimate(config, replace(cfg, seq=seq)).total <= gib * me.GiB

    lo, hi = 1, 1 << 22
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimates() -> list[dict]:
    from qlora_kit.estimate import analytic as me

    rows = []
    for name, config, gib in (("llama-3.1-8b", me.BUILTIN_CONFIGS["llama-3.1-8b"], 24),
                              ("llama-3-70b", LLAMA3_70B, 80)):
        config = {**config, "max_position_embeddings": 1 << 22}
        for option, fields in OPTIONS.items():
            cfg = me.EstimateConfig(batch=1, rank=16, lora_dropout=0.05, device="cuda", **fields)
            seq = longest(config, cfg, gib)
            e = me.estimate(config, replace(cfg, seq=seq))
            rows.append({"model": name, "gpu_gib": gib, "option": option, "max_seq": seq,
                         "device_bytes": e.total, "host_offloaded_bytes": e.host.get("offloaded_activations", 0),
                         **{f"peer_{k}": v for k, v in PEERS[(name, gib)].items()}})
            print(f"{name} {gib} GiB, {option}: {seq:,}", file=sys.stderr)
    return rows


def measure(seq: int, fields: dict, threads: int) -> dict:
    flags = [a for k, v in fields.items()
             for a in ("--" + k.replace("_", "-"), str(int(v) if isinstance(v, bool) else v))]
    cmd = [sys.executable, "-m", "qlora_kit.measure.breakdown", "--json", "--seq", str(seq), "--batch", "1",
           "--steps", "2", "--threads", str(threads), *flags]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--estimates-only", action="store_true")
    ap.add_argument("--seqs", default="1024,4096")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    from qlora_kit.measure.breakdown import machine_info

    doc = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info(),
           "command": "python bench/long_context.py " + " ".join(sys.argv[1:]), "estimates": estimates(),
           "measured": []}
    seqs = [int(s) for s in args.seqs.split(",")]
    if not args.estimates_only:
        for option in (list(OPTIONS)[0], list(OPTIONS)[-1]):
            runs = {}
            for seq in seqs:
                r = measure(seq, OPTIONS[option], args.threads)
                runs[seq] = {k: r[k] for k in ("peak_bytes", "estimate_total", "error", "peak_phase", "host",
                                               "estimate_host", "tokens_per_s", "rss")}
                print(f"{option} seq {seq}: live {r['peak_bytes'] / 2**20:.1f} MiB (estimate {r['error']:+.1%})",
                      file=sys.stderr)
            lo, hi = seqs[0], seqs[-1]
            slope = (runs[hi]["peak_bytes"] - runs[lo]["peak_bytes"]) / (hi - lo)
            doc["measured"].append({"option": option, "runs": runs, "bytes_per_token": slope})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(doc, indent=1) + "\n")
    m = doc["machine"]
    lines = ["# Long context: longest sequence (estimate) and bytes per token (measured)", "",
             f"{doc['date']}. Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
             f"load average {m['loadavg']} (shared with other jobs). Command: `{doc['command']}`.", "",
             "Estimates (`qlora_kit.estimate.analytic`, CUDA, batch 1, r=16 all-linear, dropout 0.05, nf4; not yet "
             "confirmed on a GPU: `bench/max_context.py` does that):", "",
             "| model, GPU memory | option | longest sequence (estimate) | host RAM for offloaded inputs | "
             "Unsloth (published, r=32) | HF + FA2 (published) |", "|---|---|--:|--:|--:|--:|"]
    for r in doc["estimates"]:
        host = f"{r['host_offloaded_bytes'] / 2**30:.1f} GiB" if r["host_offloaded_bytes"] else "-"
        lines.append(f"| {r['model']}, {r['gpu_gib']} GiB | {r['option']} | {r['max_seq']:,} | {host} | "
                     f"{r['peer_unsloth']:,} | {r['peer_hf_fa2']:,} |")
    if doc["measured"]:
        lines += ["", "Measured on the CPU (smollm2-135m, batch 1, r=16 all-linear, dropout 0.05): live tensors at "
                  "the step's peak (device-resident; offloaded bytes apart), per extra token between seq "
                  f"{seqs[0]} and {seqs[-1]}:", "",
                  "| option | seq | live at peak | estimate | error | peak phase | offloaded (host) | tokens/s |",
                  "|---|--:|--:|--:|--:|---|--:|--:|"]
        for row in doc["measured"]:
            for seq, r in row["runs"].items():
                lines.append(f"| {row['option']} | {seq} | {r['peak_bytes'] / 2**20:.1f} MiB | "
                             f"{r['estimate_total'] / 2**20:.1f} MiB | {r['error']:+.1%} | {r['peak_phase']} | "
                             f"{r['host']['offloaded_activations'] / 2**20:.1f} MiB | {r['tokens_per_s']} |")
            lines.append(f"| **{row['option']}: bytes per extra token** | | **{row['bytes_per_token'] / 1024:.1f} "
                         "KiB** | | | | | |")
    (out / "long_context.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
