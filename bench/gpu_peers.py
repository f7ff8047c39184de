"""qlora-kit against the standard QLoRA recipe on one CUDA GPU: a Llama-3.1-8B-shaped model with random weights.

    python bench/gpu_peers.py --out bench/results/gpu    # on a machine with a CUDA GPU; writes gpu_peers.json/.md

Needs: this repository installed (`make install` or `pip install -e ".[dev]"`, a CUDA build of torch), about 20 GB
free disk for the model folder (default: $TMPDIR/qlora-kit-llama8b-random, built once, reused), no network.

1. The model: LlamaConfig with Llama-3.1-8B's shapes (hidden 4096, 32 layers, MLP 14336, GQA 32/8, vocab 128256,
   untied lm_head) and random bf16 weights (normal, std 0.02; norms 1), generated on the GPU tensor by tensor and
   written shard by shard (4 GB), so neither RAM nor GPU ever holds the whole model. A 300-token BPE tokenizer is
   saved with it (only the loaders need one; batches are random ids).
2. Each measurement is a child process, alternating ours / peer (/ ours with a smaller loss chunk) for --rounds:
   the same batch (B x S random ids, all labelled), LoRA r=16, alpha=32, dropout 0.05 on every Linear but lm_head,
   nf4 + double quant, bf16 compute, non-reentrant (ours) / PEFT-default (peer) checkpointing, torch AdamW.
   The peer is bench/memory_peers.py's recipe on device_map={"": 0}: from_pretrained(BitsAndBytesConfig 4-bit) +
   prepare_model_for_kbit_training + get_peft_model + gradient_checkpointing_enable + model(**batch).loss.
   `peer_noupcast` is the same recipe without prepare_model_for_kbit_training's fp32 up-cast of embeddings, norms
   and lm_head (+2.1 GB at 8B): 16-bit like ours, so our ratios must hold against both.
   Measured: torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps (reset after warm-up)
   and over the whole process (loading included); device memory in use (torch.cuda.mem_get_info: with the CUDA
   context); tokens/s over --steps steps after --warmup steps.
3. `python -m qlora_kit.measure.breakdown --device cuda` on the same folder: the estimate against the measured peak,
   component by component (unless --no-breakdown).
Targets: ours peak allocated < 7 GiB; tokens/s >= 1.3x the peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
GiB = 1 << 30

from benchlib import build_random_llama  # noqa: E402 (bench/ is on sys.path above)


def model_config(shape: str):
    from transformers import LlamaConfig

    from qlora_kit.estimate.analytic import BUILTIN_CONFIGS
    from memory_peers import TINY

    if shape == "tiny":  # a smoke test of this script on any machine
        return LlamaConfig(**TINY, dtype="bfloat16")
    c = {k: v for k, v in BUILTIN_CONFIGS["llama-3.1-8b"].items() if k not in ("model_type", "torch_dtype")}
    return LlamaConfig(**c, rope_theta=500000.0, bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype="bfloat16")


def build_folder(folder: Path, shape: str, shard_bytes: int = 4 * 10**9) -> Path:
    return build_random_llama(folder, model_config(shape), shard_bytes)


def child(args) -> dict:
    import torch

    import memory_peers
    from qlora_kit.measure.breakdown import synthetic_batch

    if args.child.startswith("peer"):
        args.loss_chunk = 0
    cuda = args.device == "cuda"
    config = json.loads((Path(args.model) / "config.json").read_text())
    batch = synthetic_batch(config["vocab_size"], args.batch, args.seq, seed=0)
    t0 = time.perf_counter()
    if args.child == "ours":
        step, _ = memory_peers._ours(args, batch)
    else:  # peer: prepare_model_for_kbit_training (fp32 up-cast); peer_noupcast: the same, 16-bit like ours
        step, _ = memory_peers._peer(args, batch, device_map={"": 0} if cuda else "cpu",
                                     upcast=args.child == "peer")
    load_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses = [step() for _ in range(args.warmup)]
    sync()
    out = {"impl": args.child + (f" (loss chunk {args.loss_chunk})" if args.loss_chunk else ""), "load_s": load_s}
    if cuda:
        out["process_max_allocated"] = torch.cuda.max_memory_allocated()
        out["process_max_reserved"] = torch.cuda.max_memory_reserved()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    sync()
    elapsed = time.perf_counter() - t0
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out |= {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
                "device_in_use": total - free, "device_total": total, "gpu": torch.cuda.get_device_name()}
    return out | {"tokens_per_s": args.batch * args.seq * args.steps / elapsed, "step_s": elapsed / args.steps,
                  "losses": [round(x, 4) for x in losses]}


def run(cmd: list[str], timeout: int) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return lines[-1]


def markdown(doc: dict) -> str:
    s = doc["settings"]
    gib = lambda n: f"{n / GiB:.2f}" if n is not None else "-"  # noqa: E731
    lines = ["# qlora-kit vs PEFT + transformers + bitsandbytes on a GPU (Llama-3.1-8B shapes, random weights)", "",
             f"{doc['date']}. Device: {doc['device']}. torch {doc['versions']['torch']}, transformers "
             f"{doc['versions']['transformers']}, peft {doc['versions']['peft']}, bitsandbytes "
             f"{doc['versions']['bitsandbytes']}.", "", f"Command: `{doc['command']}`", "",
             f"batch {s['batch']} x seq {s['seq']}, LoRA r={s['rank']} alpha={2 * s['rank']} dropout={s['dropout']} "
             f"on every Linear but lm_head; nf4 + double quant; {s['warmup']} warm-up + {s['steps']} timed steps; "
             f"{s['rounds']} rounds alternating. Peaks over the timed steps, in GiB; medians over rounds. Targets: "
             "ours < 7 GiB allocated; tokens/s >= 1.3x the peer.", "",
             "| implementation | max allocated | max reserved | device in use | max allocated incl. loading | "
             "tokens/s | allocated vs peer | tokens/s vs peer |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    med, peer = doc["summary"], doc["summary"]["peer"]
    for impl, m in med.items():
        mem = f"{m['max_allocated'] / peer['max_allocated']:.2f}x" if peer["max_allocated"] else "-"
        lines.append(f"| {impl} | {gib(m['max_allocated'])} | {gib(m['max_reserved'])} | {gib(m['device_in_use'])} | "
                     f"{gib(m['process_max_allocated'])} | {m['tokens_per_s']:,.0f} | {mem} | "
                     f"{m['tokens_per_s'] / peer['tokens_per_s']:.2f}x |")
    if doc.get("breakdown"):
        b = doc["breakdown"]
        lines += ["", f"Estimate vs measured (`qlora_kit.measure.breakdown --device cuda`): predicted "
                  f"{gib(b['estimate_total'] - b['cuda_context'])} GiB allocated (+ {gib(b['cuda_context'])} GiB "
                  f"context allowance), measured {gib(b['peak_bytes'])} GiB ({b['error']:+.1%}); "
                  f"max_memory_allocated {gib(b['cuda'].get('max_allocated'))} GiB.", "",
                  "| component | predicted | measured at peak |", "|---|---:|---:|"]
        for k, v in b["estimate"].items():
            lines.append(f"| {k} | {gib(v)} | {gib(b['at_peak'][k])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "gpu"))
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "qlora-kit-llama8b-random"))
    ap.add_argument("--shape", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b",
                    help="tiny: a smoke test of this script (any machine, with --device cpu)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ours-loss-chunk", type=int, default=1024, help="also run ours with this loss chunk (0: no)")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--loss-chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["ours", "peer", "peer_noupcast"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import bitsandbytes
    import peft
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: this benchmark needs one (try --shape tiny --device cpu for a smoke test)",
              file=sys.stderr)
        return 2
    folder = build_folder(Path(args.folder), args.shape)
    common = ["--model", str(folder), "--seq", str(args.seq), "--batch", str(args.batch), "--rank", str(args.rank),
              "--dropout", str(args.dropout), "--threads", str(args.threads), "--device", args.device]
    impls = ["ours", "peer", "peer_noupcast"] + ([f"ours:{args.ours_loss_chunk}"] if args.ours_loss_chunk else [])
    runs = []
    for rnd in range(args.rounds):
        for impl in impls if rnd % 2 == 0 else impls[::-1]:
            name, _, chunk = impl.partition(":")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--loss-chunk", chunk or "0",
                   "--steps", str(args.steps), "--warmup", str(args.warmup), *common]
            r = {"round": rnd, **json.loads(run(cmd, args.timeout))}
            runs.append(r)
            print(f"[{len(runs)}/{len(impls) * args.rounds}] {r['impl']}: max allocated "
                  f"{r.get('max_allocated', 0) / GiB:.2f} GiB, {r['tokens_per_s']:,.0f} tok/s", file=sys.stderr,
                  flush=True)
    summary = {}
    for impl in dict.fromkeys(r["impl"] for r in runs):
        rs = [r for r in runs if r["impl"] == impl]
        summary[impl] = {k: statistics.median(r[k] for r in rs) if k in rs[0] else None
                         for k in ("max_allocated", "max_reserved", "device_in_use", "process_max_allocated",
                                   "tokens_per_s")}
    breakdown = None
    if not args.no_breakdown:
        cmd = [sys.executable, "-m", "qlora_kit.measure.breakdown", "--json", "--steps", "3", *common]
        breakdown = json.loads(run(cmd, args.timeout))
        from qlora_kit.estimate.analytic import CUDA_CONTEXT_BYTES

        breakdown["cuda_context"] = CUDA_CONTEXT_BYTES if args.device == "cuda" else 0
    doc = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "command": shlex.join(["python", "bench/gpu_peers.py", *(argv if argv is not None else sys.argv[1:])]),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "bitsandbytes": bitsandbytes.__version__},
           "settings": {k: getattr(args, k) for k in ("shape", "seq", "batch", "rank", "dropout", "steps", "warmup",
                                                      "rounds")},
           "runs": runs, "summary": summary, "breakdown": breakdown}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("gpu_peers" if args.shape == "llama-3.1-8b" and args.device == "cuda"
            else f"gpu_peers_{args.shape}_{args.device}")
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
