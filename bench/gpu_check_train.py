"""bench/gpu_check.py's training stage: the nf4/fp4/int8 x adamw/adamw8bit/paged_adamw8bit matrix, each run killed
after its middle checkpoint and resumed, then one probe of optimizer state, host syncs and speed (see gpu_check.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "qlora_kit.cli.main"]
QUANTS, OPTIMIZERS = ("nf4", "fp4", "int8"), ("adamw", "adamw8bit", "paged_adamw8bit")


def build_model(ctx) -> Path:
    from transformers import LlamaConfig

    from benchlib import build_random_llama

    s = ctx.shape
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2, dtype="bfloat16")
    folder = build_random_llama(ctx.work / f"llama-h{s['hidden']}-l{s['layers']}", cfg)
    data = ctx.work / "facts.jsonl"
    # plain text (the benchmark tokenizer has 300 tokens: an alpaca template alone would fill a short sequence)
    data.write_text("".join(json.dumps({"text": f"Fact {i}: the river Tamsk flows {i % 7} ways. " * 4}) + "\n"
                            for i in range(64)))
    ctx.folder, ctx.data = folder, data
    return folder


def recipe_dict(ctx, q: str, o: str) -> dict:
    s = ctx.shape
    return {"model": {"path": str(ctx.folder)}, "quant": {"type": q},
            "lora": {"r": s["rank"], "alpha": 2 * s["rank"], "dropout": 0.05},
            "data": {"path": str(ctx.data), "format": "text", "max_length": s["seq"]},
            "train": {"steps": s["steps"], "batch_size": s["batch"], "grad_accum": 2, "lr": s["lr"], "warmup_steps": 2,
                      "save_every": s["steps"] // 2, "keep_checkpoints": 3, "optimizer": o, "device": ctx.dev_name}}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_after_checkpoint(ctx, recipe_path: Path, out: Path, step: int) -> None:
    from qlora_kit.run import checkpoint

    proc = subprocess.Popen([*CLI, "train", str(recipe_path), "--out", str(out), "--no-progress"], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        latest = checkpoint.latest(out)
        if latest is not None and int(latest.name.split("-")[1]) >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(f"the run to kill ended by itself (exit {proc.returncode}): {proc.stderr.read()[-1500:]}")


def sync_origin(filename: str) -> str:
    for key in ("qlora_kit", "transformers", "bitsandbytes", "accelerate"):
        if os.sep + key + os.sep in filename:
            return key
    return "torch" if os.sep + "torch" + os.sep in filename else "other"


def step_probe(ctx, recipe, ckpt: Path) -> dict:
    """Load the killed run's checkpoint into a fresh prepare: optimizer state kinds, then timed steps and syncs."""
    import torch

    from qlora_kit.train import loop as train
    from qlora_kit.data import pipeline as data
    from qlora_kit.adapters import lora
    from qlora_kit.run import checkpoint
    from qlora_kit.quant import bnb as quant

    p = train.prepare(recipe)
    adapter, opt_state, _ = checkpoint.load(ckpt)
    lora.load_adapter_state(p.model, adapter)
    p.optimizer.load_state_dict(opt_state)
    states = [v for st in p.optimizer.inner.state.values() for k, v in st.items() if k in ("state1", "exp_avg")]
    out = {"state_dtype": str(states[0].dtype) if states else None,
           "paged": bool(states) and all(quant.is_paged(t) for t in states)}
    pad = data.pad_token_id(p.tokenizer)
    micro = [data.collate(p.dataset.train[i:i + ctx.shape["batch"]], pad) for i in (0, ctx.shape["batch"])]
    cuda = ctx.device.type == "cuda"
    train.train_step(p, micro, 1e-4, 1.0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    t, tokens = time.perf_counter(), 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            for _ in range(2):
                tokens += train.train_step(p, micro, 1e-4, 1.0).tokens
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    if cuda:
        torch.cuda.synchronize()
    out["tokens_per_s"] = round(tokens / (time.perf_counter() - t), 1)
    syncs: dict[str, int] = {}
    for w in seen:
        if "synchroniz" in str(w.message).lower():
            syncs[sync_origin(w.filename)] = syncs.get(sync_origin(w.filename), 0) + 1
    out["syncs_per_step"] = {k: v / 2 for k, v in syncs.items()}
    out["peak_bytes"] = train.peak_memory_bytes(ctx.device)
    del p
    if cuda:
        torch.cuda.empty_cache()
    return out


def matrix(ctx) -> dict:
    import yaml

    from qlora_kit.train import loop as train
    from qlora_kit.config import recipe_from_dict

    build_model(ctx)
    rows, bad = {}, []
    half = ctx.shape["steps"] // 2
    for q in QUANTS:
        for o in OPTIMIZERS:
            name = f"{q}/{o}"
            if o.startswith("paged") and ctx.device.type != "cuda":
                rows[name] = {"status": "skipped (paged needs CUDA)"}
                continue
            try:
                raw = recipe_dict(ctx, q, o)
                recipe = recipe_from_dict(raw)
                ref_dir, kill_dir = ctx.work / "runs" / f"{q}-{o}", ctx.work / "runs" / f"{q}-{o}-killed"
                path = ctx.work / f"{q}-{o}.yaml"
                path.write_text(yaml.safe_dump(raw))
                train.run(recipe, ref_dir, progress=False)
                kill_after_checkpoint(ctx, path, kill_dir, half)
                train.run(recipe, kill_dir, resume=True, progress=False)
                a, b = losses(ref_dir), losses(kill_dir)
                diff = max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
                row = {"loss_first": a[0], "loss_last": a[-1], "resume_max_loss_diff": diff,
                       "resume_bitwise": a == b, **step_probe(ctx, recipe, kill_dir / "checkpoints" / f"step-{half}")}
                expect_paged = o.startswith("paged")
                ok = diff <= 1e-2 * max(a) and row["paged"] == expect_paged and a[-1] < a[0] \
                    and (row["state_dtype"] == "torch.uint8") == ("8bit" in o) \
                    and row["syncs_per_step"].get("qlora_kit", 0) <= 2
                row["status"] = "ok" if ok else "fail"
                rows[name] = row
                ctx.runs[name] = ref_dir
            except Exception as e:
                rows[name] = {"status": "fail", "error": f"{type(e).__name__}: {e}"}
            if rows[name]["status"] == "fail":
                bad.append(name)
    if bad:
        raise AssertionError(f"failed: {', '.join(bad)}; rows: {json.dumps(rows, default=str)[:3000]}")
    tps = [r["tokens_per_s"] for r in rows.values() if "tokens_per_s" in r]
    return {"rows": rows, "summary": f"{len(tps)} combinations trained, killed, resumed; "
                                     f"{min(tps):,.0f}-{max(tps):,.0f} tokens/s"}
