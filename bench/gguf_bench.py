"""GGUF export benchmark: time and peak RSS of `qlora-kit export --format gguf` (f16, q8_0, and q4_k_m when the
llama-cpp extra is installed) beside the merged safetensors export, on the demo model, a large random Llama and a
random Qwen3-MoE of about the same size (adapter on attention and every expert); and, for the demo model, how close
the GGUF's logits (read back by transformers' own GGUF loader) are to the merged model's, per type.

Each export runs in its own fresh process (peak RSS = that process's VmHWM; 'work' = minus its RSS after imports),
variants interleaved, OMP_NUM_THREADS set and OMP_WAIT_POLICY=PASSIVE (docs/ARCHITECTURE.md, "Benchmarks").

    python bench/gguf_bench.py --threads 2                     # demo + random llama-1.6b (~3.2 GB bf16)
    python bench/gguf_bench.py --random-config none            # demo only
    python bench/gguf_bench.py --no-demo                       # the random models only, added to the results
    python bench/gguf_bench.py --no-demo --random-config none  # the random Qwen3-MoE only (~1.8 GB bf16)

Writes bench/results/gguf.json and bench/results/gguf.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
VARIANTS = {"merged bf16 (safetensors)": ("merged", None), "gguf f16": ("gguf", "f16"), "gguf q8_0": ("gguf", "q8_0"),
            "gguf q4_k_m": ("gguf", "q4_k_m")}  # q4_k_m: only with the llama-cpp extra (ggml's quantizer)
# random mixtures of experts built on disk (benchlib.build_random_model), Qwen3MoeConfig arguments
MOE_CONFIGS = {
    # 0.91 B parameters, 1.83 GB bf16: 16 layers of 32 experts (top 4), 1536 expert Linears, untied head
    "qwen3moe-0.9b": dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_experts=32,
                          num_experts_per_tok=4, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                          head_dim=64, vocab_size=32000, tie_word_embeddings=False, norm_topk_prob=True),
    "qwen3moe-tiny": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                          num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, vocab_size=32000, tie_word_embeddings=False, norm_topk_prob=True),
}


def worker(args) -> None:
    from qlora_kit.export import formats as ex
    from qlora_kit.measure.breakdown import rss_kib

    after_imports = rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    ex.export(args.adapter, ex.Options(args.format, Path(args.out), base=args.base, gguf_type=args.gguf_type or "f16",
                                       progress=False))
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    written = sum(p.stat().st_size for p in (out.glob("*.safetensors") if out.is_dir() else [out]))
    print(json.dumps({"seconds": seconds, "bytes": written, "peak_rss": rss_kib("VmHWM") * 1024,
                      "rss_after_imports": after_imports}))


def build_random_moe(name: str, folder: Path) -> Path:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from benchlib import build_random_model

    config = Qwen3MoeConfig(**MOE_CONFIGS[name], max_position_embeddings=4096, dtype=torch.bfloat16,
                            bos_token_id=1, eos_token_id=2)
    return build_random_model(folder, config, Qwen3MoeForCausalLM)


def moe_adapter(base: Path, folder: Path, r: int = 16) -> Path:
    """A random LoRA (r 16, bf16) on attention's q/k/v/o and on every routed expert's gate_up_proj (2I, H) and
    down_proj (H, I), named as training names them (model/moe.py), in PEFT's format (target_parameters)."""
    import torch

    from qlora_kit.adapters import peft_format
    from qlora_kit.export import shards

    g = torch.Generator().manual_seed(1)

    def pair(module: str, out_f: int, in_f: int) -> dict:
        return {f"{module}.lora_A.weight": torch.randn(r, in_f, generator=g, dtype=torch.bfloat16).mul_(0.02),
                f"{module}.lora_B.weight": torch.randn(out_f, r, generator=g, dtype=torch.bfloat16).mul_(0.02)}

    tensors = {}
    for name, info in shards.tensor_index(base).items():
        module, leaf = name.rsplit(".", 1)[0], name.rsplit(".", 2)[-2]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors |= pair(module, *info.shape)
        elif ".experts." in name and name.endswith(".gate_proj.weight"):  # the checkpoint's per-expert gate
            i, h = info.shape
            stem = name[: -len("gate_proj.weight")]
            tensors |= pair(f"{stem}gate_up_proj", 2 * i, h) | pair(f"{stem}down_proj", h, i)
    return peft_format.save_adapter(folder, tensors, r=r, alpha=2 * r, dropout=0.0, rslora=False, base_model=str(base),
                                    model_type="qwen3_moe")


def run_one(variant: str, base: Path, adapter: Path, work: Path, env: dict) -> dict:
    fmt, kind = VARIANTS[variant]
    out = work / ("out" if fmt == "merged" else "out.gguf")
    for p in (work / "out", work / "out.gguf", work / "out.Modelfile"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
           "--format", fmt] + (["--gguf-type", kind] if kind else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{res.stderr[-3000:]}")
    rec = json.loads(res.stdout.strip().splitlines()[-1]) | {"variant": variant}
    print(f"  {variant:28s} {rec['seconds']:7.1f} s  {rec['bytes'] / 1e9:6.3f} GB  peak RSS "
          f"{rec['peak_rss'] / 2**30:5.2f} GiB (+{(rec['peak_rss'] - rec['rss_after_imports']) / 2**30:.2f})",
          flush=True)
    return rec


def demo_accuracy(base: Path, adapter: Path, work: Path) -> dict:
    """Relative logit error of each GGUF type vs the merged fp32 model, through transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.export import formats as ex

    ex.export(adapter, ex.Options("merged", work / "merged32", dtype="fp32", progress=False, force=True))
    tok = AutoTokenizer.from_pretrained(work / "merged32")
    ids = tok("<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
              "<|im_start|>assistant\nParis is the capital.", return_tensors="pt").input_ids

    def logits(folder, **kw):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    ref = logits(work / "merged32")
    out = {}
    for kind in ("f16", "bf16", "q8_0"):
        g = work / "g"
        shutil.rmtree(g, ignore_errors=True)
        ex.export(adapter, ex.Options("gguf", g / f"m-{kind}.gguf", gguf_type=kind, progress=False))
        got = logits(g, gguf_file=f"m-{kind}.gguf")
        out[kind] = {"rel_logit_error": ((got - ref).norm() / ref.norm()).item(),
                     "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        print(f"  {kind}: relative logit error {out[kind]['rel_logit_error']:.2e}, "
              f"argmax agreement {out[kind]['argmax_agreement']:.3f}", flush=True)
    shutil.rmtree(work / "merged32", ignore_errors=True)
    shutil.rmtree(work / "g", ignore_errors=True)
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# GGUF export benchmark", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, shared with other jobs "
             f"(load average at start {m.get('loadavg', '?')}).",
             f"Command: `{result['command']}` ({result['threads']} threads, OMP_WAIT_POLICY=PASSIVE). Each export in a "
             "fresh process, variants interleaved; adapter r=16 on all linear layers, dequantized (NF4) merge base.",
             ""]
    for label, block in result["models"].items():
        lines += [f"## {label} ({block['bytes'] / 1e9:.2f} GB bf16)", ""]
        if "command" in block:
            lines += [f"Command: `{block['command']}`" + (f"; load average (1/5/15 min) at the end "
                      f"{'/'.join(f'{x:.1f}' for x in block['load_average'][0])}" if "load_average" in block else "")
                      + (f"; {block['note']}" if "note" in block else "") + ".", ""]
        lines += [
                  "| variant | s | output GB | peak RSS | work RSS |", "|---|---|---|---|---|"]
        for r in block["runs"]:
            lines.append(f"| {r['variant']} | {r['seconds']:.1f} | {r['bytes'] / 1e9:.3f} | "
                         f"{r['peak_rss'] / 2**30:.2f} GiB | "
                         f"{(r['peak_rss'] - r['rss_after_imports']) / 2**30:.2f} GiB |")
        if "accuracy" in block:
            lines += ["", "Logits through transformers' GGUF loader vs the merged fp32 model (one chat prompt):", "",
                      "| type | relative logit error | argmax agreement |", "|---|---|---|"]
            lines += [f"| {k} | {v['rel_logit_error']:.2e} | {v['argmax_agreement']:.3f} |"
                      for k, v in block["accuracy"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-config", default="llama-1.6b", help="merge_bench preset or config.json; 'none' to skip")
    p.add_argument("--no-demo", action="store_true", help="skip --model; keep the previous results' other blocks")
    p.add_argument("--moe-config", default="qwen3moe-0.9b", help=f"{', '.join(MOE_CONFIGS)}; 'none' to skip")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workdir", default="/tmp/qlora-gguf-bench")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--base", "--adapter", "--out", "--format", "--gguf-type"):
        p.add_argument(a, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from merge_bench import build_random_model, machine, random_adapter, worker_env

    from qlora_kit.export import shards
    from qlora_kit.model.load import resolve

    env = worker_env(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = [] if args.no_demo else [(args.model, resolve(args.model), False)]
    if args.random_config != "none":
        models.append((f"random {args.random_config}", build_random_model(args.random_config, work / "random"), True))
    if args.moe_config != "none":
        models.append((f"random {args.moe_config}", build_random_moe(args.moe_config, work / "random-moe"), "moe"))
    from qlora_kit.export.gguf import kquant

    variants = [v for v in VARIANTS if VARIANTS[v][1] != "q4_k_m" or kquant.available()]
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    result = {"command": " ".join([exe, *sys.argv]), "threads": args.threads, "machine": machine(), "models": {}}
    for label, base, temporary in models:
        moe = temporary == "moe"
        adapter = (moe_adapter if moe else random_adapter)(base, work / f"adapter-{base.name}")
        print(f"{label}: {base}", flush=True)
        start = os.getloadavg()
        runs = [run_one(v, base, adapter, work, env) for _ in range(args.repeats) for v in variants]
        block = {"bytes": sum(i.nbytes for i in shards.tensor_index(base).values()), "runs": runs,
                 "command": result["command"], "load_average": [os.getloadavg(), "at the end"]}
        if moe:
            block["note"] = (f"load average (1/5/15 min) at the start {'/'.join(f'{x:.1f}' for x in start)}; "
                             "adapter r=16 on attention and every routed expert, "
                             "nf4 round trip of each expert's [gate; up] and down slices")
        if not temporary:
            block["accuracy"] = demo_accuracy(base, adapter, work)
        result["models"][label] = block
        shutil.rmtree(adapter, ignore_errors=True)
        if temporary:
            shutil.rmtree(base, ignore_errors=True)
    for p in (work / "out", work / "out.gguf", work / "out.Modelfile"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    results = Path(args.results)
    if args.no_demo and (results / "gguf.json").is_file():  # keep the other models' blocks of the last run
        old = json.loads((results / "gguf.json").read_text())
        result["models"] = {**{k: {"command": old["command"], "note": f"load average at its start "
                                   f"{old['machine'].get('loadavg')}", **v} for k, v in old["models"].items()},
                            **result["models"]}
    (results / "gguf.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / "gguf.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
