"""DPO on a 4-bit base: qlora-kit against TRL's DPOTrainer + PEFT + bitsandbytes on the CPU, same pairs, same shapes.

The peer is TRL's QLoRA DPO recipe as its docs give it:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=bfloat16, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, bf16 compute))
    DPOTrainer(model, args=DPOConfig(per_device_train_batch_size=B, max_length=S, beta, gradient_checkpointing=True,
               bf16=True, use_cpu=True, adamw_torch, constant lr, max_grad_norm 1.0), train_dataset=pairs,
               processing_class=tokenizer, peft_config=LoraConfig(r, alpha, every Linear but lm_head, no dropout))
    trainer.train()      # its reference: the same model with the adapter disabled (TRL's default with PEFT)
ours is `qlora_kit.train.loop.prepare` + `train_step` (what `qlora-kit train` runs) with train.objective dpo on the
same records, nf4 + double quant, bf16 compute, the same rank, alpha, targets, beta, lr and checkpointing.

The records are conversations (a user turn, then a long assistant answer), rendered by the model's chat template on
both sides; every answer is longer than --seq, so every row of both sides is truncated to exactly --seq tokens: both
run 2 x --batch rows of --seq tokens per step. Each measurement is a child process (`--child ours|peer`): RSS after
importing the libraries (before loading), peak RSS of the timed steps alone (VmHWM reset after warm-up), the median
time of --steps steps after --warmup, and the bytes held by live tensors at the worst moment of one profiled step
(the CPU analogue of CUDA's max_memory_allocated). Children alternate ours, peer, peer, ours (A B B A) per round.

    flock /tmp/bench.lock python bench/dpo_peers.py     # writes bench/results/dpo_peers.json and .md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ("plain answers help readers decide quickly because every sentence carries one fact and no hedging at all "
         "so the reader never has to guess what was meant or which of several readings is the intended one").split()


def records(n: int, answer_words: int) -> list[dict]:
    """n conversational pairs whose answers are far longer than any --seq used (truncated on both sides)."""
    out = []
    for i in range(n):
        def answer(shift: int, i: int = i) -> str:
            return " ".join(WORDS[(i + shift + k) % len(WORDS)] for k in range(answer_words))
        out.append({"prompt": [{"role": "user", "content": f"Question {i}: what makes an answer useful?"}],
                    "chosen": [{"role": "assistant", "content": answer(0)}],
                    "rejected": [{"role": "assistant", "content": "maybe " + answer(7)}]})
    return out


# ---- children ----------------------------------------------------------------------------------------------------


def child(args) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  both sides import the same heavy libraries before the baseline
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from qlora_kit.measure.breakdown import rss_kib
    from qlora_kit.train import loop as train  # noqa: F401

    baseline = rss_kib()
    t0 = time.perf_counter()
    out = (_ours if args.child == "ours" else _peer)(args)
    out.update(impl=args.child, baseline_rss=baseline * 1024, load_and_run_s=round(time.perf_counter() - t0, 1),
               process_peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out["step_peak_growth"] = out["step_peak_rss"] - out["baseline_rss"]
    return out


class Probe:
    """Step timing, VmHWM reset after warm-up, and one profiled step after the timed ones: the same for both sides
    (ours calls begin/end around train_step; the peer's TrainerCallback calls them at on_step_begin/end)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.done, self.times, self.prof, self.rss = warmup, steps, 0, [], None, 0

    def begin(self):
        import torch

        from qlora_kit.measure.breakdown import _reset_rss_peak

        if self.done == self.warmup:
            _reset_rss_peak()
        if self.done == self.warmup + self.steps:
            from qlora_kit.measure.breakdown import rss_kib

            self.rss = rss_kib("VmHWM")  # the timed steps' peak, before the profiler adds its own
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        self.t0 = time.perf_counter()

    def end(self):
        dt = time.perf_counter() - self.t0
        if self.warmup <= self.done < self.warmup + self.steps:
            self.times.append(dt)
        if self.prof is not None and self.done == self.warmup + self.steps:
            self.prof.__exit__(None, None, None)
        self.done += 1

    def result(self, static_bytes: int, losses: list[float]) -> dict:
        from qlora_kit.measure.timeline import read_events, replay

        return {"step_s": statistics.median(self.times), "step_s_all": [round(t, 3) for t in self.times],
                "step_peak_rss": self.rss * 1024, "static_tensors": static_bytes,
                "live_tensor_peak": static_bytes + replay(read_events(self.prof, "cpu"))["peak"],
                "losses": [round(x, 4) for x in losses]}


def _ours(args) -> dict:
    from qlora_kit.config import recipe_from_dict
    from qlora_kit.data import pipeline as data, preference as data_preference
    from qlora_kit.measure.breakdown import static_inventory
    from qlora_kit.train import loop as train

    n = args.warmup + args.steps + 1
    p = train.prepare(recipe_from_dict({
        "model": {"path": args.model}, "quant": {"type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "targets": TARGETS},
        "data": {"path": args.data, "format": "preference", "max_length": args.seq, "val_fraction": 0.0},
        "train": {"objective": "dpo", "beta": args.beta, "steps": n, "batch_size": args.batch, "lr": args.lr,
                  "schedule": "constant", "warmup_steps": 0, "optimizer": "adamw", "device": "cpu",
                  "num_threads": args.threads, "gradient_checkpointing": True, "seed": 0}}))
    pad = data.pad_token_id(p.tokenizer)
    units = p.dataset.train
    probe, losses = Probe(args.warmup, args.steps), []
    for i in range(n):
        batch = data_preference.collate(units[i * args.batch : (i + 1) * args.batch], pad)
        assert batch["input_ids"].shape == (2 * args.batch, args.seq), batch["input_ids"].shape
        probe.begin()
        losses.append(train.train_step(p, [batch], lr=args.lr, max_grad_norm=1.0).loss)
        probe.end()
    return probe.result(sum(static_inventory(p.model, p.optimizer).values()), losses)


def _peer(args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from benchlib import peer_static_bytes

    n = args.warmup + args.steps + 1
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    probe, losses = Probe(args.warmup, args.steps), []

    class Callback(TrainerCallback):
        def on_step_begin(self, *a, **k):
            probe.begin()

        def on_step_end(self, *a, **k):
            probe.end()

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    out = tempfile.mkdtemp(prefix="dpo-peer-")
    config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                       max_steps=n, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                       max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
                       gradient_checkpointing=True, bf16=True, use_cpu=True, max_length=args.seq, beta=args.beta,
                       disable_dropout=True, dataloader_num_workers=0, seed=0, data_seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=args.data)["train"],
                         processing_class=tokenizer, callbacks=[Callback()],
                         peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                target_modules=TARGETS, task_type="CAUSAL_LM"))
    batch = next(iter(trainer.get_train_dataloader()))
    widths = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape") and v.dim() == 2}
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    res = probe.result(peer_static_bytes(trainer.model, optimizer), losses)
    res["batch_shapes"] = widths  # the peer's rows: prompt + completion, truncated to --seq
    return res


# ---- parent ------------------------------------------------------------------------------------------------------


METRICS = ("live_tensor_peak", "step_peak_growth", "step_s")


def markdown(doc: dict) -> str:
    m, s, med, r = doc["machine"], doc["settings"], doc["medians"], doc["ratios"]
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    loads = [x for run in doc["runs"] for x in (run["loadavg_before"], run["loadavg_after"])]
    lines = [
        "# DPO on a 4-bit base: qlora-kit vs TRL DPOTrainer + PEFT + bitsandbytes (CPU)", "",
        f"{doc['date']}. Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, shared "
        f"with other jobs (1-minute load average {min(loads):.1f} to {max(loads):.1f} during the run); "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".", "",
        f"Command: `{doc['command']}`", "",
        f"Model: {s['model']} (the bundled demo model). {s['batch']} pairs per step = {2 * s['batch']} rows of "
        f"{s['seq']} tokens on both sides (conversational pairs through the chat template, answers truncated); "
        f"LoRA r={s['rank']} alpha={2 * s['rank']}, no dropout, on {', '.join(TARGETS)}; nf4 + double quant, "
        f"bf16 compute; DPO beta {s['beta']}, lr {s['lr']}; gradient checkpointing on both; {s['warmup']} warm-up "
        f"+ {s['steps']} timed steps per process; {s['rounds']} rounds of ours, peer, peer, ours; "
        f"OMP_NUM_THREADS={s['threads']}.", "",
        "Live tensors: bytes held by tensors at the worst moment of one profiled step (static + transient). RSS "
        "growth: the timed steps' peak RSS minus the same process's RSS after importing the libraries, before "
        "loading. Step time: median over the timed steps. Ratio = ours / peer; goals: memory <= 0.6x, "
        "speed (peer time / our time) >= 1.2x.", "",
        "| measure | qlora-kit | TRL + PEFT + bnb | ratio |", "|---|---:|---:|---:|",
        f"| live tensors at peak, MiB | {mib(med['ours']['live_tensor_peak'])} | "
        f"{mib(med['peer']['live_tensor_peak'])} | **{r['live_tensor_peak']:.2f}x** |",
        f"| of which static (weights, adapters, optimizer), MiB | {mib(med['ours']['static_tensors'])} | "
        f"{mib(med['peer']['static_tensors'])} | {r['static_tensors']:.2f}x |",
        f"| peak RSS growth (steps), MiB | {mib(med['ours']['step_peak_growth'])} | "
        f"{mib(med['peer']['step_peak_growth'])} | **{r['step_peak_growth']:.2f}x** |",
        f"| step time, s | {med['ours']['step_s']:.2f} | {med['peer']['step_s']:.2f} | "
        f"speed **{r['speed']:.2f}x** |", "", "Every run (in order):", "",
        "| # | impl | median step s | steps s | live tensors MiB | RSS growth MiB | load avg | losses |",
        "|---:|---|---:|---|---:|---:|---|---|"]
    for i, x in enumerate(doc["runs"], 1):
        lines.append(f"| {i} | {x['impl']} | {x['step_s']:.2f} | {', '.join(map(str, x['step_s_all']))} | "
                     f"{mib(x['live_tensor_peak'])} | {mib(x['step_peak_growth'])} | {x['loadavg_before']} -> "
                     f"{x['loadavg_after']} | {', '.join(map(str, x['losses']))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-name", default="smollm2-135m", help="a built-in name or a model folder")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="pairs per step (2 rows each)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of ours, peer, peer, ours")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    from benchlib import run_json_child
    from qlora_kit.measure.breakdown import machine_info
    from qlora_kit.model.load import resolve

    machine = machine_info()
    model = resolve(args.model_name)
    data = Path(tempfile.mkdtemp(prefix="dpo-peers-")) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(args.batch * (args.warmup + args.steps + 2),
                                                                    answer_words=4 * args.seq)))
    runs = []
    for rnd in range(args.rounds):
        for impl in ("ours", "peer", "peer", "ours"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--model", str(model), "--data",
                   str(data), *[x for k in ("seq", "batch", "rank", "beta", "lr", "steps", "warmup", "threads")
                                for x in (f"--{k}", str(getattr(args, k)))]]
            r = {"round": rnd, **run_json_child(cmd, args.threads, args.timeout)}
            runs.append(r)
            print(f"[{len(runs)}/{4 * args.rounds}] {impl}: step {r['step_s']:.2f} s, live tensors "
                  f"{r['live_tensor_peak'] / 2**20:,.0f} MiB, RSS growth {r['step_peak_growth'] / 2**20:,.0f} MiB "
                  f"(load {r['loadavg_before']})", file=sys.stderr, flush=True)
    medians = {impl: {k: statistics.median(r[k] for r in runs if r["impl"] == impl)
                      for k in (*METRICS, "static_tensors")} for impl in ("ours", "peer")}
    ratios = {k: medians["ours"][k] / medians["peer"][k] for k in (*METRICS, "static_tensors")}
    ratios["speed"] = medians["peer"]["step_s"] / medians["ours"]["step_s"]
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
           "command": shlex.join(["flock", "/tmp/bench.lock", "python", "bench/dpo_peers.py",
                                  *(argv if argv is not None else sys.argv[1:])]),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
           "settings": {"model": args.model_name, **{k: getattr(args, k) for k in (
               "seq", "batch", "rank", "beta", "lr", "steps", "warmup", "rounds", "threads")}},
           "runs": runs, "medians": medians, "ratios": ratios}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo_peers.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "dpo_peers.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
