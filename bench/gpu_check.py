"""`make gpu-check`: within minutes on one CUDA GPU, does qlora-kit work there and how fast.

    python bench/gpu_check.py --out bench/results/gpu            # a CUDA GPU; < 8 minutes on an H100/H200
    python bench/gpu_check.py --cpu-smoke --out /tmp/gpu-smoke   # the same stages on tiny shapes, on the CPU

Stages, in order; each is timed, a failing stage never stops the next, and the JSON is rewritten after every stage
(a killed run still leaves what it learned): gpu_check.json + gpu_check.md in --out.
  1. bnb_sanity    bitsandbytes' CUDA kernels first: 4-bit GEMV (batch 1) and dequantize+matmul (batch 8) against
                   a float64 reference of the same codes; int8 codes identical on CPU and CUDA.
  2. pytest_gpu    `pytest -m gpu` (it fails when no CUDA is found: on --cpu-smoke that failure is the expected result).
  3. matrix        a real-width random Llama (hidden 2048, 2 layers, MLP 5480: down_proj's in_features is not a
                   multiple of 64; vocab 32000; LoRA r=64 on every Linear), for nf4/fp4/int8 x adamw/adamw8bit/
                   paged_adamw8bit: 20 steps, grad_accum 2, batch 4 x 256 tokens. The same recipe runs in a child
                   process that is SIGKILLed after its step-10 checkpoint and resumed; losses are compared with the
                   uninterrupted run. From the step-10 checkpoint, the optimizer state is loaded and checked (8-bit
                   stays uint8; paged is paged again); then 2 steps under torch.cuda.set_sync_debug_mode("warn"),
                   synchronisations counted by origin (qlora_kit / transformers / bitsandbytes / torch), and tokens/s.
  4. export        adapter / merged / quantized with --device cuda; the quantized and merged exports reloaded
                   through transformers (+ bitsandbytes), their logits against the training-time model's.
  5. generate      `generate` on CUDA, one run and a mixed batch of two adapters and the base; decode tokens/s with
                   bitsandbytes' 4-bit GEMV against dequantize+matmul (quant.GEMV_DECODE).
  6. bench_memory  `qlora-kit bench memory --device cuda`: measured peak against the estimate.
  7. max_context   bench/max_context.py: longest sequence under a 24 GiB cap, offload off/on, vs the estimate.
  8. gpu_peers     only with --peers (minutes more: an 8B-shaped model): bench/gpu_peers.py, both peers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from gpu_check_train import CLI, OPTIMIZERS, QUANTS, build_model, matrix  # noqa: E402 (bench/ is on sys.path above)
GPU_SHAPE = dict(hidden=2048, intermediate=5480, layers=2, heads=16, kv_heads=8, vocab=32000, seq=256, batch=4,
                 rank=64, steps=20, lr=1e-3)
SMOKE_SHAPE = dict(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=300, seq=64, batch=2, rank=4,
                   steps=8, lr=1e-2)


class Check:
    """Runs stages within a time budget and writes the results after each one."""

    def __init__(self, args):
        self.args, self.out, self.t0 = args, Path(args.out), time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.stem = "gpu_check_cpu_smoke" if args.cpu_smoke else "gpu_check"
        self.doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]), "stages": {}}

    def stage(self, name: str, fn, *a):
        if time.perf_counter() - self.t0 > self.args.budget_s:
            rec = {"status": "skipped", "why": f"over the {self.args.budget_s} s budget"}
        else:
            t = time.perf_counter()
            try:
                rec = {"status": "ok", **(fn(*a) or {})}
            except Exception as e:  # a failing stage is a finding, not the end of the check
                rec = {"status": "fail", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-3000:]}
            rec["seconds"] = round(time.perf_counter() - t, 1)
        self.doc["stages"][name] = rec
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {name}: {rec['status']}"
              + (f" ({rec.get('error', rec.get('why', ''))})" if rec["status"] != "ok" else ""), file=sys.stderr)
        self.write()
        return rec

    def write(self):
        self.doc["wall_s"] = round(time.perf_counter() - self.t0, 1)
        (self.out / f"{self.stem}.json").write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        lines = [f"# make gpu-check ({self.doc.get('device', '?')})", "", f"{self.doc['date']}, "
                 f"`{self.doc['command']}`, {self.doc['wall_s']} s.", "", "| stage | status | seconds | summary |",
                 "|---|---|---:|---|"]
        for name, r in self.doc["stages"].items():
            summary = r.get("summary") or r.get("error") or r.get("why") or ""
            lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {summary} |")
        (self.out / f"{self.stem}.md").write_text("\n".join(lines) + "\n")


def run(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **kw.pop("env", {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


# ---- 1. bitsandbytes sanity ----------------------------------------------------------------------------------------


def bnb_sanity(ctx) -> dict:
    import torch

    from qlora_kit.quant import bnb as quant

    n = 256 if ctx.smoke else 4096
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, n, generator=g) * 0.02).bfloat16().to(ctx.device)
    out = {}
    for kind in ("nf4", "fp4"):
        layer = quant.QuantLinear.from_weight(w, quant.QuantSpec(kind))
        ref_w = quant._dequantize_4bit_torch(layer.quant_tensors(), layer.spec, (n, n), torch.float32).double()
        for rows in (1, 8):
            x = torch.randn(1, rows, n, generator=g).bfloat16().to(ctx.device)
            with torch.no_grad():
                y = quant.gemv_4bit(x, layer) if rows == 1 else layer(x)
            ref = x.double() @ ref_w.T
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            out[f"{kind}_rows{rows}_rel_err"] = err
            if err > 2e-2:
                raise AssertionError(f"{kind} x {rows} rows: relative error {err:.3g} against float64 (> 2e-2)")
    spec = quant.QuantSpec("int8")
    q_dev, q_cpu = quant.quantize(w, spec), quant.quantize(w.cpu(), spec)
    if not torch.equal(q_dev["qweight"].cpu(), q_cpu["qweight"]):
        raise AssertionError("int8 codes differ between the CPU and this device")
    out["summary"] = f"4-bit GEMV and matmul within {max(out.values()):.1e} of float64; int8 codes equal CPU's"
    return out


# ---- 2. pytest -m gpu ------------------------------------------------------------------------------------------


def pytest_gpu(ctx) -> dict:
    r = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/"], timeout=300)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    if ctx.smoke:  # no CUDA: the run must fail, with the message
        if r.returncode == 0 or "no CUDA GPU is visible" not in r.stdout + r.stderr:
            raise AssertionError(f"pytest -m gpu without CUDA should fail with a message; got {r.returncode}")
        return {"summary": f"fails without CUDA as it must (exit {r.returncode})"}
    if r.returncode != 0:
        raise AssertionError(f"pytest -m gpu exit {r.returncode}: {tail[0]}\n{r.stdout[-3000:]}")
    return {"summary": tail[0]}


# ---- 4. export, 5. generate ------------------------------------------------------------------------------------


def logits_of_training_model(ctx, run_dir: Path, ids):
    import torch

    from qlora_kit.infer import generate

    loaded = generate.load(str(run_dir), device=ctx.dev_name)
    with torch.no_grad():
        return loaded.model(input_ids=ids.to(ctx.device)).logits.float().cpu()


def export(ctx) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = ctx.runs.get("nf4/adamw")
    if run_dir is None:
        raise AssertionError("no nf4/adamw run from the matrix stage to export")
    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = logits_of_training_model(ctx, run_dir, ids)
    out = {}
    for fmt in ("adapter", "merged", "quantized"):
        dest = ctx.work / "export" / fmt
        r = run([*CLI, "export", str(run_dir), "--format", fmt, "--out", str(dest), "--device", ctx.dev_name,
                 "--force"])
        if r.returncode != 0:
            raise AssertionError(f"export {fmt}: exit {r.returncode}: {r.stderr[-1500:]}")
        if fmt == "adapter" or (fmt == "quantized" and ctx.device.type != "cuda"):
            continue  # transformers loads bitsandbytes 4-bit checkpoints on CUDA only
        m = AutoModelForCausalLM.from_pretrained(dest, device_map={"": 0} if ctx.device.type == "cuda" else "cpu")
        with torch.no_grad():
            got = m(input_ids=ids.to(m.device)).logits.float().cpu()
        out[f"{fmt}_logits_rel_err"] = float((got - ref).abs().max() / ref.abs().max())
        del m
    limits = {"merged_logits_rel_err": 0.05, "quantized_logits_rel_err": 0.25}  # bf16 rounding; requantization
    worse = {k: v for k, v in out.items() if v > limits[k]}
    if worse:
        raise AssertionError(f"exported logits too far from the training-time model: {worse}")
    out["summary"] = ", ".join(f"{k} {v:.3g}" for k, v in out.items()) or "adapter only"
    return out


def generate_stage(ctx) -> dict:
    import torch

    from qlora_kit.infer import generate
    from qlora_kit.quant import bnb as quant

    run_a, run_b = ctx.runs.get("nf4/adamw"), ctx.runs.get("nf4/adamw8bit")
    if run_a is None or run_b is None:
        raise AssertionError("needs the nf4/adamw and nf4/adamw8bit runs of the matrix stage")
    one = run([*CLI, "generate", str(run_a), "--prompt", "What is fact number 3?", "--max-new-tokens", "16",
               "--device", ctx.dev_name])
    mixed = run([*CLI, "generate", str(run_a), "--adapter", f"a={run_a}", "--adapter", f"b={run_b}", "--prompt",
                 "a: What is fact number 3?", "--prompt", "b: What is fact number 4?", "--prompt", "base: Hello",
                 "--max-new-tokens", "16", "--device", ctx.dev_name])
    for what, r in (("generate", one), ("mixed-batch generate", mixed)):
        if r.returncode != 0:
            raise AssertionError(f"{what}: exit {r.returncode}: {r.stderr[-1500:]}")
    loaded = generate.load(str(run_a), device=ctx.dev_name)
    speeds = {}
    n = 8 if ctx.smoke else 64
    for gemv in (True, False, True):  # interleaved: the first pair warms up
        quant.GEMV_DECODE = gemv
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x = torch.tensor([[5, 6, 7, 8]], device=ctx.device)
        with torch.no_grad():
            y = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=2)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        speeds["gemv" if gemv else "dequantize"] = round((y.shape[1] - 4) / (time.perf_counter() - t), 1)
    quant.GEMV_DECODE = True
    summary = (f"decode {speeds['gemv']:.0f} tok/s with GEMV, {speeds['dequantize']:.0f} without" if not ctx.smoke
               else "generate and mixed batch ran; GEMV is CUDA-only, so the decode speeds are not compared here")
    return {"decode_tokens_per_s": speeds, "mixed_output": mixed.stdout[-600:], "summary": summary}


# ---- 6. bench memory, 7. max-context slot, 8. peers -------------------------------------------------------------


def bench_memory(ctx) -> dict:
    s = ctx.shape
    dest = ctx.out / ("memory_cpu_smoke" if ctx.smoke else "memory")
    r = run([*CLI, "bench", "memory", "--model", str(ctx.folder), "--config",
             f"seq={s['seq']} batch={s['batch']} rank={s['rank']} quant=nf4", "--device", ctx.dev_name,
             "--out", str(dest), "--steps", "3", "--no-progress"], timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"bench memory: exit {r.returncode}: {r.stderr[-1500:]}")
    found = re.findall(r"[-+]?\d+\.\d+%", r.stdout)
    return {"stdout_tail": r.stdout[-1500:], "summary": f"estimate vs measured: {found[0] if found else 'see json'}"}


def max_context(ctx) -> dict:
    """bench/max_context.py: an 8B-shaped random model under a 24 GiB cap, offload off and on, against the estimate
    (CPU smoke: the tiny shape, nothing capped). Short budgets here; a full bracket: run it alone with more."""
    if ctx.smoke:
        extra = ["--shape", "tiny", "--device", "cpu", "--cap-gib", "0.1", "--configs", "0:64,1:64", "--trials", "2"]
    else:
        extra = ["--trials", "2", "--time-budget", "60"]
    r = run([sys.executable, str(HERE / "max_context.py"), "--out", str(ctx.out), *extra], timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"max_context: exit {r.returncode}: {r.stderr[-1500:]}")
    rows = [x for x in r.stdout.splitlines() if x.startswith("| o")]
    return {"summary": "; ".join(rows) or r.stdout.strip().splitlines()[-1]}


def gpu_peers(ctx) -> dict:
    r = run([sys.executable, str(HERE / "gpu_peers.py"), "--out", str(ctx.out), "--rounds", "1", "--steps", "3"],
            timeout=3600)
    if r.returncode != 0:
        raise AssertionError(f"gpu_peers: exit {r.returncode}: {r.stderr[-1500:]}")
    return {"summary": (r.stdout + r.stderr).strip().splitlines()[-1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"))
    ap.add_argument("--work", default=None, help="models, runs and exports (default: a folder in $TMPDIR)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks this script, not a GPU")
    ap.add_argument("--budget-s", type=int, default=480, help="stages that would start after this are skipped")
    ap.add_argument("--peers", action="store_true", help="also run bench/gpu_peers.py (8B shapes: minutes more)")
    ap.add_argument("--only", default=None, help="comma-separated stages to run (e.g. to re-run a failed one)")
    args = ap.parse_args(argv)
    import tempfile

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("make gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); for a dry run of the script "
              "on the CPU: python bench/gpu_check.py --cpu-smoke", file=sys.stderr)
        return 2
    ctx = argparse.Namespace(smoke=args.cpu_smoke, shape=SMOKE_SHAPE if args.cpu_smoke else GPU_SHAPE, runs={},
                             out=Path(args.out), work=Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")))
    for q in QUANTS:  # runs a previous check left in --work (for --only export,generate)
        for o in OPTIMIZERS:
            if (ctx.work / "runs" / f"{q}-{o}" / "adapter").is_dir():
                ctx.runs[f"{q}/{o}"] = ctx.work / "runs" / f"{q}-{o}"
    ctx.dev_name = "cpu" if args.cpu_smoke else "cuda"
    ctx.device = torch.device(ctx.dev_name)
    check = Check(args)
    import bitsandbytes
    import transformers

    check.doc |= {"device": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "CPU (smoke test)",
                  "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__},
                  "shape": ctx.shape, "work": str(ctx.work)}
    stages = [("bnb_sanity", bnb_sanity), ("pytest_gpu", pytest_gpu), ("matrix", matrix), ("export", export),
              ("generate", generate_stage), ("bench_memory", bench_memory), ("max_context", max_context)]
    if args.peers:
        stages.append(("gpu_peers", gpu_peers))
    only = set(args.only.split(",")) if args.only else None
    for name, fn in stages:
        if only is not None and name not in only:
            continue
        if name in ("export", "generate", "bench_memory") and "folder" not in ctx:
            build_model(ctx)
        check.stage(name, fn, ctx)
    failed = [n for n, r in check.doc["stages"].items() if r["status"] == "fail"]
    print(f"gpu-check: {len(failed)} stage(s) failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{check.out / check.stem}.md", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
