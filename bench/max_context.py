"""Max-context probe: the longest sequence that completes a training step of a Llama-3.1-8B-shaped model
(random weights) with GPU memory capped at 24 GiB, with activation offload off and on, against the estimate.

    python bench/max_context.py --out bench/results/gpu                       # one CUDA GPU; a few minutes
    python bench/max_context.py --shape tiny --device cpu --out /tmp/mc      # smoke test of the script, any machine

For each configuration (default: tiled MLP 4096 with offload off, then on) a child process loads the model once
(train.prepare: nf4 + double quant, LoRA r=16 alpha=32 dropout 0.05 on every Linear but lm_head, batch 1, bf16,
AdamW), caps the CUDA caching allocator with torch.cuda.set_per_process_memory_fraction(cap / total) and
expandable segments, and runs `train.train_step` on a random all-labelled batch of S tokens: first S = the estimate's
longest sequence for the cap (allocator bytes: the estimate without its CUDA-context allowance, which the cap does
not cover), then up or down by --step until one length completes and the next one up does not (or --trials or
--time-budget runs out: the result says which bracket is known). A failed length is a torch.cuda.OutOfMemoryError;
after one, gradients are dropped and the cache emptied before the next try. Results: max_context.json / .md in --out.

On the CPU (--device cpu) nothing is capped, so every length "fits": that mode only checks that the script runs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
GiB = 1 << 30


def predicted(config: dict, cfg, cap_bytes: int) -> int:
    """Longest seq whose estimate (allocator bytes: without the CUDA-context allowance) fits `cap_bytes`."""
    from qlora_kit.estimate import analytic as me

    context = me.CUDA_CONTEXT_BYTES if cfg.device == "cuda" else 0

    def fits(seq):
        return me.estimate(config, replace(cfg, seq=seq)).total - context <= cap_bytes

    lo, hi = 1, 1 << 22
    if not fits(lo):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def child(args) -> dict:
    import torch

    from qlora_kit.estimate import analytic as me
    from qlora_kit.train import loop as train
    from qlora_kit.measure.breakdown import MeasureConfig, recipe_for, synthetic_batch

    cuda = args.device == "cuda"
    cap = int(args.cap_gib * GiB)
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    config = json.loads((Path(args.model) / "config.json").read_text())
    data = Path(tempfile.mkdtemp()) / "one.jsonl"
    data.write_text(json.dumps({"text": "probe"}) + "\n")
    mcfg = MeasureConfig(model=args.model, rank=16, seq=args.start or 256, batch=1, dropout=0.05, device=args.device,
                         offload_activations=bool(args.offload), mlp_chunk=args.mlp_chunk, threads=args.threads)
    p = train.prepare(recipe_for(mcfg, data))
    ecfg = me.EstimateConfig(rank=16, batch=1, seq=256, lora_dropout=0.05, device=args.device,
                             offload_activations=bool(args.offload), mlp_chunk=args.mlp_chunk)
    guess = predicted(config, ecfg, cap)
    seq = args.start or guess
    trials, ok, bad, t_start = [], None, None, time.perf_counter()
    while len(trials) < args.trials and time.perf_counter() - t_start < args.time_budget and seq > 0:
        batch = synthetic_batch(config["vocab_size"], 1, seq, seed=0)
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            loss = train.train_step(p, [batch], lr=1e-5, max_grad_norm=1.0).loss
            if cuda:
                torch.cuda.synchronize()
            row = {"seq": seq, "fits": True, "loss": round(loss, 4)}
        except torch.cuda.OutOfMemoryError as e:
            row = {"seq": seq, "fits": False, "error": str(e).splitlines()[0][:200]}
            p.optimizer.zero_grad()
        row["step_s"] = round(time.perf_counter() - t0, 2)
        if cuda:
            row |= {"max_allocated": torch.cuda.max_memory_allocated(),
                    "max_reserved": torch.cuda.max_memory_reserved()}
        row["estimate_allocator_bytes"] = me.estimate(config, replace(ecfg, seq=seq)).total - (
            me.CUDA_CONTEXT_BYTES if cuda else 0)
        trials.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if p.offload is not None:
            p.offload.clear()
        if row["fits"]:
            ok = max(ok or 0, seq)
        else:
            bad = min(bad or seq, seq)
        if ok and bad and bad <= int(ok * (1 + args.step)) + 1:
            break  # bracketed to within one step
        seq = int(seq * (1 + args.step)) if bad is None else (int(seq / (1 + args.step)) if ok is None else
                                                               (ok + bad) // 2)
    return {"offload_activations": bool(args.offload), "mlp_chunk": args.mlp_chunk, "cap_bytes": cap,
            "predicted_max_seq": guess, "longest_completed": ok, "shortest_failed": bad, "trials": trials,
            "bracketed": bool(ok and bad), "device": torch.cuda.get_device_name() if cuda else "cpu"}


def markdown(doc: dict) -> str:
    lines = ["# Max-context probe: longest sequence that completes a training step under a memory cap", "",
             f"{doc['date']}. Device: {doc['device']}. Model: {doc['shape']} shape, random weights, batch 1, LoRA r=16 "
             f"all-linear, dropout 0.05, nf4. Cap: {doc['cap_gib']} GiB (set_per_process_memory_fraction). Command: "
             f"`{doc['command']}`.", ""]
    if doc["device"] == "cpu":
        lines += ["**CPU smoke test: nothing is capped on the CPU, so every length fits; these rows only show that "
                  "the script runs.**", ""]
    lines += ["| offload | mlp_chunk | estimate: longest | longest completed | shortest failed (OOM) | "
              "completed / estimate | trials |", "|---|--:|--:|--:|--:|--:|--:|"]
    for r in doc["results"]:
        ratio = f"{r['longest_completed'] / r['predicted_max_seq']:.3f}" if r["longest_completed"] and \
            r["predicted_max_seq"] else "-"
        lines.append(f"| {'on' if r['offload_activations'] else 'off'} | {r['mlp_chunk']} | {r['predicted_max_seq']:,}"
                     f" | {r['longest_completed'] or '-'} | {r['shortest_failed'] or '-'} | {ratio} | "
                     f"{len(r['trials'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "gpu"))
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "qlora-kit-llama8b-random"))
    ap.add_argument("--shape", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--configs", default="0:4096,1:4096", help="offload:mlp_chunk pairs, comma-separated")
    ap.add_argument("--step", type=float, default=0.08, help="relative step between tried lengths")
    ap.add_argument("--trials", type=int, default=4, help="lengths tried per configuration at most")
    ap.add_argument("--time-budget", type=float, default=150, help="seconds of trials per configuration")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--offload", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mlp-chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: this probe needs one (--shape tiny --device cpu is a smoke test)", file=sys.stderr)
        return 2
    from gpu_peers import build_folder

    folder = build_folder(Path(args.folder + ("-tiny" if args.shape == "tiny" else "")), args.shape)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    results = []
    for pair in args.configs.split(","):
        off, _, chunk = pair.partition(":")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(folder), "--device",
               args.device, "--cap-gib", str(args.cap_gib), "--offload", off, "--mlp-chunk", chunk or "0",
               "--step", str(args.step), "--trials", str(args.trials), "--time-budget", str(args.time_budget),
               "--threads", str(args.threads), "--start", str(args.start)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        if p.returncode or not lines:
            print(f"{shlex.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1]))
        r = results[-1]
        print(f"offload {off}, mlp_chunk {chunk}: estimate {r['predicted_max_seq']:,}, completed "
              f"{r['longest_completed']}, failed {r['shortest_failed']}", file=sys.stderr, flush=True)
    doc = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "device": results[0]["device"] if results else args.device, "shape": args.shape, "cap_gib": args.cap_gib,
           "command": shlex.join(["python", "bench/max_context.py", *(argv if argv is not None else sys.argv[1:])]),
           "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("max_context" if args.device == "cuda" and args.shape != "tiny"
            else f"max_context_{args.shape}_{args.device}")
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
