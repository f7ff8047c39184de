"""qlora-kit against the standard QLoRA recipe on the CPU: peak memory and tokens/s, interleaved, one process each.

The peer is what users run today (PEFT docs, "quantization" guide):
    AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
        bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    prepare_model_for_kbit_training(model)          # up-casts every non-4-bit parameter to fp32, as users get
    get_peft_model(model, LoraConfig(r, alpha, target_modules=<every Linear but lm_head>, dropout))
    model.gradient_checkpointing_enable()
    a plain loop: loss = model(input_ids, attention_mask, labels=labels).loss; backward; clip 1.0; torch AdamW
ours is `qlora_kit.train.loop.prepare` + `train_step` (the functions `qlora-kit train` runs), same batch, rank, alpha,
dropout, targets, sequence length. The peer stays in train mode throughout (docs/ARCHITECTURE.md, "bitsandbytes
hazards": an eval forward under no_grad on AVX512-BF16 CPUs repacks bitsandbytes weights and breaks training).

Each measurement is a child process (`--child ours|peer`): baseline RSS after importing the libraries, before
loading; peak RSS of the process (ru_maxrss: loading included) and of the steady steps alone (VmHWM reset after
warm-up); steady-state tokens/s over --steps steps after --warmup steps; and the bytes held by live tensors at the
worst moment of one profiled step (the CPU analogue of CUDA max_memory_allocated). Children alternate
ours, peer, ours, peer... for --rounds rounds, with OMP_NUM_THREADS and OMP_WAIT_POLICY=PASSIVE set.

    python bench/memory_peers.py --out bench/results        # writes memory_peers.json and memory_peers.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import peer_loop

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def build_tiny(folder: Path, tokenizer_from: Path) -> Path:
    """A random Llama (hidden 256, 4 layers, vocab 32000; every in_features a multiple of 64: see
    docs/ARCHITECTURE.md, "bitsandbytes hazards"), bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)  # only to satisfy loaders; batches are ids
    return folder


# ---- children ----------------------------------------------------------------------------------------------------


def child(args) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  both sides import the same heavy libraries before the baseline
    import transformers  # noqa: F401

    if args.child == "peer":
        import peft  # noqa: F401
        args.loss_chunk = 0
    else:
        from qlora_kit.train import loop as train  # noqa: F401
    from qlora_kit.measure.breakdown import rss_kib, synthetic_batch
    from qlora_kit.measure.timeline import read_events, replay

    baseline = rss_kib()
    config = json.loads((Path(args.model) / "config.json").read_text())
    batch = synthetic_batch(config["vocab_size"], args.batch, args.seq, seed=0)
    t0 = time.perf_counter()
    step, static = (_ours if args.child == "ours" else _peer)(args, batch)
    load_s = time.perf_counter() - t0
    losses = [step() for _ in range(args.warmup)]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: the steps' own peak from here
    t0 = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    elapsed = time.perf_counter() - t0
    step_peak = rss_kib("VmHWM")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return {"impl": args.child + (f" (loss chunk {args.loss_chunk})" if args.loss_chunk else ""),
            "baseline_rss": baseline * 1024,
            "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_peak_rss": step_peak * 1024, "live_tensor_peak": static() + replay(read_events(prof, "cpu"))["peak"],
            "static_tensors": static(), "tokens_per_s": args.batch * args.seq * args.steps / elapsed,
            "step_s": elapsed / args.steps, "load_s": load_s, "losses": [round(x, 4) for x in losses]}


def _ours(args, batch):
    from qlora_kit.train import loop as train
    from qlora_kit.measure.breakdown import MeasureConfig, recipe_for, static_inventory

    data = Path(tempfile.mkdtemp()) / "one.jsonl"
    data.write_text(json.dumps({"text": "benchmark"}) + "\n")
    cfg = MeasureConfig(model=args.model, rank=args.rank, seq=args.seq, batch=args.batch, dropout=args.dropout,
                        threads=args.threads, steps=args.steps, device=getattr(args, "device", "cpu"),
                        loss_chunk=args.loss_chunk or MeasureConfig.loss_chunk)  # a variant: another chunk size
    p = train.prepare(recipe_for(cfg, data))
    return (lambda: train.train_step(p, [batch], lr=1e-4, max_grad_norm=1.0).loss,
            lambda: sum(static_inventory(p.model, p.optimizer).values()))


def _peer(args, batch, device_map="cpu", upcast: bool = True):
    """upcast=True: the recipe most users run, with prepare_model_for_kbit_training, which also up-casts embeddings,
    norms and lm_head to fp32 (+2.1 GB at 8B). upcast=False: the same without that up-cast (16-bit like ours); only
    the input gradients checkpointing needs are enabled, so the comparison holds against both."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=q, device_map=device_map)
    if upcast:
        model = prepare_model_for_kbit_training(model)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable()
    model.train()
    return peer_loop(model, batch)


# ---- parent ------------------------------------------------------------------------------------------------------


def run_child(impl: str, model: Path, args) -> dict:
    impl, _, chunk = impl.partition(":")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--loss-chunk", chunk or "0",
           "--model", str(model), "--seq",
           str(args.seq), "--batch", str(args.batch), "--rank", str(args.rank), "--dropout", str(args.dropout),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        raise SystemExit(f"{impl} on {model} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - t0, 1), "loadavg_before": round(load, 2),
            "loadavg_after": round(os.getloadavg()[0], 2)}


METRICS = ("process_peak_growth", "process_peak_rss", "step_peak_growth", "step_peak_rss", "live_tensor_peak",
           "tokens_per_s")


def summarize(runs: list[dict]) -> dict:
    """Per model: medians over rounds for each implementation, and ratios of each qlora-kit variant to the peer."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        side = {}
        for impl in dict.fromkeys(r["impl"] for r in runs):
            rs = [r for r in runs if r["model"] == model and r["impl"] == impl]
            for r in rs:
                r["process_peak_growth"] = r["process_peak_rss"] - r["baseline_rss"]
                r["step_peak_growth"] = r["step_peak_rss"] - r["baseline_rss"]
            side[impl] = {k: statistics.median(r[k] for r in rs) for k in (*METRICS, "baseline_rss")}
            side[impl]["tokens_per_s_all"] = [round(r["tokens_per_s"], 1) for r in rs]
        peer = side["peer"]
        ratios = {impl: {k: v[k] / peer[k] for k in METRICS} for impl, v in side.items() if impl != "peer"}
        out[model] = {"medians": side, "ratios": ratios}
    return out


def markdown(doc: dict) -> str:
    m, s = doc["machine"], doc["settings"]
    noisy = max(max(r["loadavg_before"], r["loadavg_after"]) for r in doc["runs"]) > 1
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    lines = [
        "# qlora-kit vs the standard PEFT + transformers + bitsandbytes QLoRA recipe (CPU)", "",
        f"{doc['date']}. Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"AVX512-BF16 {'yes' if m['avx512_bf16'] else 'no'}; torch {doc['versions']['torch']}, transformers "
        f"{doc['versions']['transformers']}, peft {doc['versions']['peft']}, bitsandbytes "
        f"{doc['versions']['bitsandbytes']}.", "",
        f"Command: `{doc['command']}`", "",
        f"Settings: batch {s['batch']} x seq {s['seq']} (random token ids, every position labelled), "
        f"LoRA r={s['rank']} "
        f"alpha={2 * s['rank']} dropout={s['dropout']} on {', '.join(TARGETS)}; nf4 + double quant, bf16 compute; "
        f"{s['warmup']} warm-up + {s['steps']} timed steps per process; "
        f"{s['rounds']} rounds, ours and peer alternating; "
        f"OMP_NUM_THREADS={s['threads']}, OMP_WAIT_POLICY=PASSIVE.", "",
        ("**The machine was shared and noisy** (1-minute load average up to "
         f"{max(max(r['loadavg_before'], r['loadavg_after']) for r in doc['runs']):.1f} on {m['cores']} cores during "
         "the run): tokens/s are medians of interleaved runs; memory is unaffected." if noisy else
         "Load average stayed below 1 during the run."), "",
        "Peak RSS growth = peak RSS minus the same process's RSS after importing torch, transformers, bitsandbytes "
        "(+ peft or qlora_kit), before loading. Process peak includes loading; step peak is the peak over the timed "
        "steps alone. Live tensors = bytes held by tensors at the worst moment of one step (allocator events). "
        "Sizes in MiB; medians over rounds; ratio = ours / peer (target: memory <= 0.8, tokens/s >= 1.0).", "",
    ]
    variants = [i for i in next(iter(doc["summary"].values()))["ratios"] if i != "ours"]
    head = ("| model | measure | qlora-kit | peer | ratio |"
            + "".join(f" qlora-kit, {v[6:-1]} | ratio |" for v in variants))
    lines += [head, "|---|---|" + "---:|" * (3 + 2 * len(variants))]
    rows = [("process_peak_growth", "peak RSS growth (process)"), ("process_peak_rss", "peak RSS total (process)"),
            ("step_peak_growth", "peak RSS growth (steps)"), ("step_peak_rss", "peak RSS total (steps)"),
            ("live_tensor_peak", "live tensors at peak"), ("tokens_per_s", "tokens/s")]
    for model, side in doc["summary"].items():
        med, ratio = side["medians"], side["ratios"]
        for key, name in rows:
            fmt = (lambda v: f"{v:,.0f}") if key == "tokens_per_s" else mib
            extra = "".join(f" {fmt(med[v][key])} | {ratio[v][key]:.2f}x |" for v in variants)
            lines.append(f"| {model} | {name} | {fmt(med['ours'][key])} | {fmt(med['peer'][key])} | "
                         f"**{ratio['ours'][key]:.2f}x** |{extra}")
    lines += ["", "Every run (in order):", "", "| # | model | impl | process peak RSS | step peak RSS | baseline | "
              "live tensors | tokens/s | load avg | losses |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(doc["runs"], 1):
        lines.append(f"| {i} | {r['model']} | {r['impl']} | {mib(r['process_peak_rss'])} | {mib(r['step_peak_rss'])} | "
                     f"{mib(r['baseline_rss'])} | {mib(r['live_tensor_peak'])} | {r['tokens_per_s']:,.0f} | "
                     f"{r['loadavg_before']} -> {r['loadavg_after']} | {r['losses'][0]} .. {r['losses'][-1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,tiny", help="comma list: built-in names, folders, or 'tiny'")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--ours-loss-chunk", type=int, default=0,
                    help="also run ours with this cross-entropy chunk (tokens) as a third variant (0: no variant)")
    ap.add_argument("--loss-chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import bitsandbytes
    import peft
    import torch
    import transformers

    from qlora_kit.measure.breakdown import machine_info
    from qlora_kit.model.load import resolve

    machine = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="qlora-kit-peers-"))
    folders = {}
    for name in args.models.split(","):
        folders[name] = build_tiny(tmp / "tiny", resolve("smollm2-135m")) if name == "tiny" else resolve(name)
    runs = []
    for rnd in range(args.rounds):
        for name, folder in folders.items():
            impls = ["ours", "peer"] + ([f"ours:{args.ours_loss_chunk}"] if args.ours_loss_chunk else [])
            for impl in impls if rnd % 2 == 0 else impls[::-1]:
                r = {"model": name, "round": rnd, **run_child(impl, folder, args)}
                runs.append(r)
                print(f"[{len(runs)}/{len(impls) * args.rounds * len(folders)}] {r['model']} {r['impl']}: "
                      f"step peak RSS "
                      f"{r['step_peak_rss'] / 2**20:,.0f} MiB, live tensors {r['live_tensor_peak'] / 2**20:,.0f} MiB, "
                      f"{r['tokens_per_s']:,.0f} tok/s (load {r['loadavg_before']})", file=sys.stderr, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    doc = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine,
           "command": shlex.join(["python", "bench/memory_peers.py", *(argv if argv is not None else sys.argv[1:])]),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "bitsandbytes": bitsandbytes.__version__},
           "settings": {k: getattr(args, k) for k in ("seq", "batch", "rank", "dropout", "steps", "warmup", "rounds",
                                                      "threads")},
           "runs": runs, "summary": summarize(runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_peers.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "memory_peers.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
