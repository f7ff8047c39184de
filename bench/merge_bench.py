"""Merge benchmark: `qlora-kit export --format merged` against PEFT's route (transformers load in bf16,
`PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`), on the demo model and on a large random Llama.

Each export runs in its own fresh process (clean peak RSS: the worker reports its own peak, VmHWM, and its RSS after
imports), variants interleaved A B C A B C so machine noise hits all of them alike, with OMP_NUM_THREADS set and
OMP_WAIT_POLICY=PASSIVE (docs/ARCHITECTURE.md, "Benchmarks"). Throughput = bytes of safetensors written / seconds of
work (load + merge + save, imports excluded).

    python bench/merge_bench.py                                    # demo model + llama-1.6b random (~3.2 GB bf16)
    python bench/merge_bench.py --random-config llama-tiny --repeats 1 --no-demo   # a quick check of the pipeline

Writes bench/results/merge.json and bench/results/merge.md. The random model is built from a config.json on disk,
written shard by shard as random bf16 tensors (never materialised whole, never in fp32), and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANDOM_CONFIGS = {
    # ~1.59 B params, ~3.2 GB in bf16: Llama-3.2-1B-like widths, 24 layers, untied 32k vocab
    "llama-1.6b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "llama-tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- workers (run in a fresh subprocess each) -----------------------------------------------------------------------


def proc_status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec,
    so a worker's ru_maxrss would include the driver's RSS at the fork."""
    from qlora_kit.measure.breakdown import rss_kib

    return rss_kib(key) * 1024


def worker(args) -> None:
    import torch  # noqa: F401  (imports are not the merge's cost: both routes import torch + safetensors)

    if args.worker == "torch-only":  # the floor of any torch-based merge: the peak RSS of `import torch` alone
        print(json.dumps({"peak_rss": proc_status("VmHWM")}))
        return

    if args.worker == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    else:
        from qlora_kit.export import formats as ex
    after_imports = proc_status("VmRSS")
    t0 = time.perf_counter()
    if args.worker == "peft":
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
        model.save_pretrained(args.out, max_shard_size="2GB")
    else:
        ex.export(args.adapter, ex.Options("merged", Path(args.out), base=args.base, merge_base=args.merge_base,
                                           dtype="bf16", max_shard_size="2GB", progress=False))
    seconds = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
    peak = proc_status("VmHWM")
    print(json.dumps({"seconds": seconds, "bytes": written, "peak_rss": peak, "rss_after_imports": after_imports}))


# ---- models -------------------------------------------------------------------------------------------------------


def build_random_model(name_or_config: str, folder: Path, shard_bytes: int = 1 << 30) -> Path:
    """A random bf16 Llama from a preset or a config.json on disk, shard by shard (benchlib.build_random_llama)."""
    from transformers import LlamaConfig

    from benchlib import build_random_llama

    if name_or_config in RANDOM_CONFIGS:
        config = LlamaConfig(**RANDOM_CONFIGS[name_or_config], max_position_embeddings=4096, dtype="bfloat16",
                             bos_token_id=1, eos_token_id=2)
    else:
        config = LlamaConfig.from_pretrained(Path(name_or_config).parent if name_or_config.endswith(".json")
                                             else name_or_config)
    return build_random_llama(folder, config, shard_bytes)


def random_adapter(base: Path, folder: Path, r: int = 16) -> Path:
    """A random LoRA (r 16, all linear layers but lm_head, bf16) in PEFT format."""
    import torch

    from qlora_kit.export import shards
    from qlora_kit.adapters import peft_format

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, info in shards.tensor_index(base).items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module.split(".")[-1] in TARGETS:
            out_f, in_f = info.shape
            tensors[f"{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g, dtype=torch.bfloat16).mul_(0.02)
            tensors[f"{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g, dtype=torch.bfloat16).mul_(0.02)
    return peft_format.save_adapter(folder, tensors, r=r, alpha=2 * r, dropout=0.0, rslora=False, base_model=str(base))


# ---- driver -------------------------------------------------------------------------------------------------------


def machine() -> dict:
    import peft
    import torch
    import transformers

    from qlora_kit.quant import bnb as quant
    from qlora_kit.measure.breakdown import machine_info

    return {**machine_info(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": quant.bitsandbytes_version()}


def run_one(variant: str, base: Path, adapter: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    worker_kind, merge_base = {"ours (dequantized)": ("ours", "dequantized"), "ours (original)": ("ours", "original"),
                               "peft merge_and_unload": ("peft", "original")}[variant]
    cmd = [sys.executable, __file__, "--worker", worker_kind, "--base", str(base), "--adapter", str(adapter),
           "--out", str(out), "--merge-base", merge_base]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{res.stderr[-3000:]}")
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec |= {"variant": variant, "gb_per_s": rec["bytes"] / 1e9 / rec["seconds"]}
    print(f"  {variant:24s} {rec['seconds']:7.1f} s  {rec['gb_per_s']:6.3f} GB/s  peak RSS "
          f"{rec['peak_rss'] / 2**30:6.2f} GiB "
          f"(+{(rec['peak_rss'] - rec['rss_after_imports']) / 2**30:.2f} over imports)",
          flush=True)
    return rec


def summarise(records: list[dict]) -> dict:
    out = {}
    for v in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == v]
        out[v] = {"runs": len(rs), "seconds_median": statistics.median(r["seconds"] for r in rs),
                  "gb_per_s_median": statistics.median(r["gb_per_s"] for r in rs),
                  "peak_rss_max": max(r["peak_rss"] for r in rs),
                  "work_rss_max": max(r["peak_rss"] - r["rss_after_imports"] for r in rs), "bytes": rs[0]["bytes"]}
    peer = out["peft merge_and_unload"]
    for s in out.values():
        s["speed_ratio_vs_peft"] = s["gb_per_s_median"] / peer["gb_per_s_median"]
        s["peak_rss_ratio_vs_peft"] = s["peak_rss_max"] / peer["peak_rss_max"]
        s["work_rss_ratio_vs_peft"] = s["work_rss_max"] / peer["work_rss_max"]
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Merge benchmark: qlora-kit export vs PEFT merge_and_unload", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM; torch {m['torch']}, "
             f"transformers {m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}.",
             f"Command: `{result['command']}` ({result['threads']} threads, OMP_WAIT_POLICY=PASSIVE).", "",
             "Every export ran in its own fresh process; variants were interleaved (A B C A B C) within this one run, "
             "so the ratios compare runs under the same machine load. The machine is shared: absolute numbers "
             "are noisy, ratios less so. GB/s = bytes of safetensors written / seconds of load+merge+save (imports "
             "excluded). Peak RSS = the worker process's VmHWM; 'work' = peak RSS minus RSS after imports. "
             "Ours fsyncs every shard; PEFT's save_pretrained does not.",
             f"Load average (1/5/15 min) at the start: {_load(result.get('load_average'))}, at the end: "
             f"{_load(result.get('load_average_end'))}.", ""]
    for model, block in result["models"].items():
        lines += [f"## {model} ({block['bytes'] / 1e9:.2f} GB bf16, adapter r={block['r']} on all linear layers)", "",
                  "| variant | runs | s (median) | GB/s | peak RSS | work RSS "
                  "| speed vs PEFT | peak RSS vs PEFT | work RSS vs PEFT |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v, s in block["summary"].items():
            lines.append(f"| {v} | {s['runs']} | {s['seconds_median']:.1f} | {s['gb_per_s_median']:.3f} | "
                         f"{s['peak_rss_max'] / 2**30:.2f} GiB | {s['work_rss_max'] / 2**30:.2f} GiB | "
                         f"{s['speed_ratio_vs_peft']:.2f}x | {s['peak_rss_ratio_vs_peft']:.2f} | "
                         f"{s['work_rss_ratio_vs_peft']:.2f} |")
        floor = result.get("torch_import_peak_rss")
        if floor:
            peer = block["summary"]["peft merge_and_unload"]["peak_rss_max"]
            lines.append(f"\nFloor: `import torch` alone peaks at {floor / 2**30:.2f} GiB = {floor / peer:.2f}x PEFT's "
                         f"peak here; no torch-based merge can be below that.")
        lines.append("")
    lines += ["'ours (original)' does PEFT's arithmetic (W + s·B@A on the checkpoint's weights, fp32 add, one cast); "
              "'ours (dequantized)' is the default, which also recomputes dequant(quant(W)) (NF4) for every adapted "
              "weight: the exact training-time base. PEFT adds the delta in bf16 in place (two roundings).", ""]
    return "\n".join(lines)


def _load(avg) -> str:
    return "/".join(f"{x:.1f}" for x in avg) if avg else "not recorded"


def worker_env(threads: int) -> dict:
    """The environment of a timed worker process: fixed, passive OpenMP threads (busy-waiting threads swing CPU
    timings 20x when another process holds a core), offline."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="demo/real model folder or built-in name")
    p.add_argument("--no-demo", action="store_true", help="skip --model")
    p.add_argument("--random-config", default="llama-1.6b",
                   help=f"preset ({', '.join(RANDOM_CONFIGS)}) or a config.json path; 'none' to skip")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workdir", default="/tmp/qlora-merge-bench")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", choices=["ours", "peft", "torch-only"], help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--merge-base", default="dequantized", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    env = worker_env(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from qlora_kit.model.load import resolve

    models = []
    if not args.no_demo:
        models.append((args.model, resolve(args.model), False))
    if args.random_config != "none":
        label = ("random "
                 f"{Path(args.random_config).stem if args.random_config.endswith('.json') else args.random_config}")
        print(f"building {label} in {work / 'random-model'} ...", flush=True)
        t = time.perf_counter()
        models.append((label, build_random_model(args.random_config, work / "random-model"), True))
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    variants = ["ours (dequantized)", "peft merge_and_unload", "ours (original)"]
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    floor = subprocess.run([sys.executable, __file__, "--worker", "torch-only"], capture_output=True, text=True,
                           env=env, check=True)
    result = {"command": " ".join([exe, *sys.argv]), "threads": args.threads, "load_average": os.getloadavg(),
              "torch_import_peak_rss": json.loads(floor.stdout.strip().splitlines()[-1])["peak_rss"],
              "machine": machine(), "models": {}}
    for label, base, temporary in models:
        adapter = random_adapter(base, work / f"adapter-{base.name}")
        print(f"{label}: {base}", flush=True)
        records = [run_one(v, base, adapter, work / "out", env) for _ in range(args.repeats) for v in variants]
        from qlora_kit.export import shards

        nbytes = sum(i.nbytes for i in shards.tensor_index(base).values())
        result["models"][label] = {"folder": str(base), "bytes": nbytes, "r": 16, "runs": records,
                                   "summary": summarise(records)}
        shutil.rmtree(adapter, ignore_errors=True)
        if temporary:
            shutil.rmtree(base, ignore_errors=True)
    result["load_average_end"] = os.getloadavg()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "merge.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / "merge.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
