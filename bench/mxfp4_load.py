"""Loading gpt-oss as released (MXFP4 experts) against the same model stored in bf16: peak RSS and seconds of
`load_base` (nf4, double quant), each load in a fresh process, the two interleaved A B A B.

    flock /tmp/bench.lock python bench/mxfp4_load.py [--repeats 2]

A random gpt-oss (hidden 512, intermediate 512, 16 experts, 4 layers: 50M expert weights, 101 MB in bf16) is saved
in bf16 and then with its experts MXFP4-encoded by the gguf package (tests/moe_models.py). Peak RSS is the worker's
VmHWM; "after imports" its RSS before loading. Writes bench/results/mxfp4_load.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = dict(hidden_size=512, intermediate_size=512, num_local_experts=16, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, head_dim=64)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(folder: str) -> None:
    import torch

    from qlora_kit.config import ModelConfig, QuantConfig
    from qlora_kit.model.load import load_base

    torch.set_num_threads(1)
    after_imports = _rss("VmRSS:")
    t = time.perf_counter()
    load_base(ModelConfig(path=folder, dtype="bf16"), QuantConfig(type="nf4"))
    print(json.dumps({"seconds": time.perf_counter() - t, "peak": _rss("VmHWM:"), "after_imports": after_imports}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from moe_models import make_moe_model, make_mxfp4_gpt_oss

    tmp = Path(tempfile.mkdtemp(prefix="mxfp4_load_"))
    folders = {"bf16": make_moe_model(tmp / "bf16", "gpt_oss", 0, **CONFIG),
               "mxfp4": make_mxfp4_gpt_oss(tmp / "mxfp4", 0, **CONFIG)}
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    rows = {k: [] for k in folders}
    for _ in range(args.repeats):
        for name, folder in folders.items():
            out = subprocess.run([sys.executable, __file__, "--worker", str(folder)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rows[name].append(json.loads(out.strip().splitlines()[-1]))
    sizes = {k: sum(f.stat().st_size for f in v.glob("*.safetensors")) for k, v in folders.items()}
    load = os.getloadavg()
    lines = ["| checkpoint | file MB | load s | peak RSS MiB | RSS after imports MiB |", "|---|---|---|---|---|"]
    for name, rs in rows.items():
        secs = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        peak = ", ".join(f"{r['peak'] / 2**20:.0f}" for r in rs)
        base = ", ".join(f"{r['after_imports'] / 2**20:.0f}" for r in rs)
        lines.append(f"| {name} | {sizes[name] / 1e6:.1f} | {secs} | {peak} | {base} |")
    text = (f"# load_base (nf4) of a random gpt-oss, bf16 vs MXFP4 experts\n\n{json.dumps(CONFIG)}\n\n"
            + "\n".join(lines) + f"\n\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    (HERE / "results" / "mxfp4_load.md").write_text(text)
    record = {"config": CONFIG, "file_bytes": sizes, "runs": rows, "load_average": load}
    (HERE / "results" / "mxfp4_load.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
