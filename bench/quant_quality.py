"""What compression costs on a real model: the QLoRA paper's Tables 2 and 3 and LoftQ's step-0 gap, on the demo
model (SmolLM2-135M-Instruct), with held-out text that exists offline (qlora_kit.data.pydoc_text).

    .venv/bin/python bench/quant_quality.py [--pieces 30] [--steps 20] [--threads 2]

(a) Table 2 analogue: held-out perplexity of the base quantized as none (bf16), int8, fp4, nf4 (no double quant),
    nf4 + double quant, and nf4 + DQ at blocksizes 32 / 128 (64 is the default).
(b) Table 3 analogue: the same fine-tune (domain adaptation on the TRAIN topics of pydoc text, fixed budget: `steps`
    steps of 4 x 128 tokens, r 16 all-linear, lr 2e-4) on the bf16 base (16-bit LoRA) vs QLoRA nf4 / fp4 / int8 and
    nf4 with lora.init loftq; held-out loss after training.
(c) LoftQ r=16 and r=64 at step 0 (5 iterations): the share of the nf4-vs-bf16 perplexity gap closed, and the extra
    load time; plus run vs merged export vs f16 GGUF export of the QLoRA nf4 run, evaluated by `eval`.
Held-out: the first `pieces` pieces of the held-out topics, 256 tokens each (longer pieces are cut), every token
scored. Writes bench/results/quant_quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TABLE2 = [("bf16 (none)", dict(type="none")), ("int8", dict(type="int8")),
          ("fp4", dict(type="fp4", double_quant=False)), ("nf4", dict(type="nf4", double_quant=False)),
          ("nf4 + DQ", dict(type="nf4", double_quant=True)),
          ("nf4 + DQ, blocksize 32", dict(type="nf4", double_quant=True, blocksize=32)),
          ("nf4 + DQ, blocksize 128", dict(type="nf4", double_quant=True, blocksize=128))]
TABLE3 = [("LoRA, bf16 base", dict(type="none"), "kaiming"), ("QLoRA nf4 + DQ", dict(type="nf4"), "kaiming"),
          ("QLoRA fp4 + DQ", dict(type="fp4"), "kaiming"), ("QLoRA int8", dict(type="int8"), "kaiming"),
          ("QLoRA nf4 + DQ, LoftQ init", dict(type="nf4"), "loftq")]
PAPER = {"table2": "LLaMA-7B..65B mean ppl (Pile CC): Int4 34.34, FP4 31.07, NF4 + DQ 27.41",
         "table3": "QLoRA NF4 + DQ matches 16-bit LoRA (e.g. LLaMA-7B MMLU 38.4 vs 38.4 BF16)",
         "loftq": "Llama-2-7B WikiText-2 ppl, r 64: 16-bit LoRA 5.08, QLoRA 5.70, LoftQ 5.24"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pieces", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="table2,loftq,table3,table3-loftq,exports",
                    help="comma-separated subset; the JSON is rewritten after each part, so a cut run keeps its parts")
    ap.add_argument("--runs", default="", help="Table 3: only these rows, by label prefix separated by ';' "
                    "(e.g. 'LoRA, bf16 base;QLoRA nf4 + DQ' for a longer budget); the first row is the reference")
    ap.add_argument("--out", default=str(RESULTS / "quant_quality"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from qlora_kit.infer import evaluation, generate, inference
    from qlora_kit.train import loop as train
    from qlora_kit.data import pipeline as data, pydoc_text
    from qlora_kit.config import DataConfig, QuantConfig, recipe_from_dict
    from qlora_kit.measure.breakdown import machine_info

    work = Path(tempfile.mkdtemp(prefix="quant_quality-"))
    paths = pydoc_text.write(work / "pydoc")
    heldout_cfg = DataConfig(path=str(paths["heldout"]), format="text", max_length=256)

    def held_out_loss(model, tok) -> tuple[float, int]:
        examples = data.build(heldout_cfg, tok, 0).train[: args.pieces]
        inference.densify(model)  # the same bf16 values, dequantized once (the numbers do not change)
        return evaluation.mean_loss(model, examples, data.pad_token_id(tok), 8)

    parts = set(args.parts.split(","))
    doc: dict = {"model": "smollm2-135m", "pieces": args.pieces, "tokens_per_piece": 256, "steps": args.steps,
                 "paper": PAPER, "parts": sorted(parts), "table2": [], "table3": [], "loftq": [], "exports": [],
                 "machine": machine_info(), "command": shlex.join(["bench/quant_quality.py", *sys.argv[1:]]),
                 "nice": os.nice(0)}

    def save() -> None:
        doc["machine"]["loadavg"] = machine_info()["loadavg"]
        Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
        write_markdown(doc, args.out + ".md")

    # (a) the base under each quantization
    for label, q in TABLE2 if "table2" in parts else []:
        t0 = time.perf_counter()
        loaded = generate.load("smollm2-135m", quant=QuantConfig(**q))
        loss, n = held_out_loss(loaded.model, loaded.tokenizer)
        doc["table2"].append({"quant": label, **q, "loss": loss, "ppl": math.exp(loss), "tokens": n,
                              "seconds": round(time.perf_counter() - t0, 1)})
        log(f"table2 {label}: ppl {math.exp(loss):.3f}")
        del loaded
        save()
    ppl = {r["quant"]: r["ppl"] for r in doc["table2"]}

    # (c) LoftQ at step 0, r 16 and 64; the plain nf4 load for the load-time comparison
    def recipe(q: dict, init: str, r: int = 16, steps: int = args.steps, out: str = "x"):
        return recipe_from_dict({
            "model": {"path": "smollm2-135m"}, "quant": q,
            "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0, "init": init},
            "data": {"path": str(paths["train"]), "format": "text", "max_length": 128},
            "train": {"steps": steps, "batch_size": 4, "lr": 2e-4, "warmup_steps": 2, "save_every": 0,
                      "device": "cpu", "seed": 0, "num_threads": args.threads}, "output": {"dir": out}})

    if "loftq" in parts:
        t0 = time.perf_counter()
        plain = train.prepare(recipe({"type": "nf4"}, "kaiming"))
        plain_load = time.perf_counter() - t0
        del plain
    for r in (16, 64) if "loftq" in parts else ():
        t0 = time.perf_counter()
        p = train.prepare(recipe({"type": "nf4"}, "loftq", r))
        load_s = time.perf_counter() - t0
        loss, _ = held_out_loss(p.model, p.tokenizer)
        gap = (ppl["nf4 + DQ"] - math.exp(loss)) / (ppl["nf4 + DQ"] - ppl["bf16 (none)"])
        doc["loftq"].append({"r": r, "iters": 5, "loss": loss, "ppl": math.exp(loss), "gap_closed": gap,
                             "loftq_seconds": round(p.loftq.seconds, 1), "load_seconds": round(load_s, 1),
                             "plain_nf4_load_seconds": round(plain_load, 1)})
        log(f"loftq r={r}: ppl {math.exp(loss):.3f}, gap closed {gap:.1%}, +{p.loftq.seconds:.0f} s")
        del p
        save()

    # (b) the same fine-tune budget on each base; held-out loss after training
    for label, q, init in TABLE3 if "table3" in parts else []:
        if init == "loftq" and "table3-loftq" not in parts:
            continue
        if args.runs and label not in args.runs.split(";"):
            continue
        run = work / label.replace(" ", "_").replace(",", "").replace("+", "")
        t0 = time.perf_counter()
        summary = train.run(recipe(q, init, out=str(run)), run, progress=False)
        res = evaluation.run(evaluation.Request(str(run), str(paths["heldout"]), max_length=256,
                                                max_examples=args.pieces))
        doc["table3"].append({"run": label, **q, "init": init, "train_loss": summary["final_loss"],
                              "heldout_loss": res.loss, "heldout_ppl": res.perplexity,
                              "train_seconds": round(time.perf_counter() - t0, 1)})
        log(f"table3 {label}: held-out loss {res.loss:.4f}")
        base16 = doc["table3"][0]["heldout_loss"]
        for row in doc["table3"]:
            row["vs_16bit_lora"] = row["heldout_loss"] / base16 - 1
        save()
        if label == "QLoRA nf4 + DQ" and "exports" in parts:
            doc["exports"] = compare_exports(run, work, paths["heldout"], args.pieces, res)
            save()
    plot(doc, args.out + ".png")
    print(Path(args.out + ".md").read_text())


def compare_exports(run: Path, work: Path, heldout: Path, pieces: int, run_res) -> list[dict]:
    """eval of the run vs its merged (bf16) export vs its f16 GGUF export, on the same held-out pieces."""
    from qlora_kit.export import formats as export
    from qlora_kit.infer import evaluation

    rows = [{"source": "run (nf4 base + adapter)", "ppl": run_res.perplexity}]
    export.export(run, export.Options("merged", work / "merged", progress=False))
    export.export(run, export.Options("gguf", work / "run.gguf", gguf_type="f16", progress=False))
    for label, src in (("merged export (bf16)", work / "merged"), ("GGUF export (f16)", work / "run.gguf")):
        res = evaluation.run(evaluation.Request(str(src), str(heldout), max_length=256, max_examples=pieces))
        rows.append({"source": label, "ppl": res.perplexity})
    for r in rows:
        r["vs_run"] = r["ppl"] / rows[0]["ppl"] - 1
        log(f"export {r['source']}: ppl {r['ppl']:.3f} ({r['vs_run']:+.2%})")
    return rows


def write_markdown(doc: dict, path: str) -> None:
    m = doc["machine"]
    t2 = {r["quant"]: r["ppl"] for r in doc["table2"]}
    lines = ["# What compression costs: the demo model (SmolLM2-135M-Instruct)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB, shared with other jobs "
             f"(load average at the end {m['loadavg']}). Command: `.venv/bin/python {doc['command']}`"
             f"{' (run at nice 19: times are upper bounds)' if doc.get('nice') else ''}.",
             f"Held-out text: {doc['pieces']} pieces of the held-out pydoc topics (qlora_kit.data.pydoc_text), "
             f"<= {doc['tokens_per_piece']} tokens each, every token scored.", "",
             f"Parts run: {', '.join(doc['parts'])}."]
    if len(t2) == len(TABLE2):
        lines += ["", "## Table 2 analogue: the base under each quantization", "", f"Paper: {doc['paper']['table2']}.",
                  "", "| base | held-out ppl | vs bf16 |", "|---|---|---|"]
        lines += [f"| {r['quant']} | {r['ppl']:.3f} | {r['ppl'] / t2['bf16 (none)'] - 1:+.1%} |" for r in doc["table2"]]
        order = ["bf16 (none)", "int8", "nf4 + DQ", "fp4"]
        holds = all(t2[a] < t2[b] for a, b in zip(order, order[1:]))
        dq = t2["nf4 + DQ"] / t2["nf4"] - 1
        lines += ["", f"Paper's ordering bf16 < int8 < nf4 < fp4: {'holds' if holds else 'does NOT hold'} here. "
                  f"nf4 + DQ vs nf4: {dq:+.2%} (target: within 0.5%)."]
    lines += ["", "## Table 3 analogue: the same fine-tune budget on each base", "",
              f"Paper: {doc['paper']['table3']}. Here: {doc['steps']} steps x 4 x 128 tokens of the TRAIN topics, "
              "r 16 on all linear layers, lr 2e-4; held-out loss after training.", "",
              "| run | train loss (last step) | held-out loss | held-out ppl | vs 16-bit LoRA |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['train_loss']:.3f} | {r['heldout_loss']:.4f} | {r['heldout_ppl']:.3f} | "
              f"{r['vs_16bit_lora']:+.2%} |" for r in doc["table3"]]
    lines += ["", "## LoftQ at step 0 (nf4 + DQ, 5 iterations)", "", f"Paper: {doc['paper']['loftq']}.", "",
              "| rank | step-0 ppl | share of the nf4-vs-bf16 gap closed | LoftQ time | load time (plain nf4 load) |",
              "|---|---|---|---|---|"] if doc["loftq"] else []
    lines += [f"| {r['r']} | {r['ppl']:.3f} | {r['gap_closed']:.1%} | {r['loftq_seconds']} s | {r['load_seconds']} s "
              f"({r['plain_nf4_load_seconds']} s) |" for r in doc["loftq"]]
    if doc["exports"]:
        lines += ["", "## Run vs its exports (QLoRA nf4 run), by `qlora-kit eval`", "",
                  "| source | held-out ppl | vs run |", "|---|---|---|"]
        lines += [f"| {r['source']} | {r['ppl']:.3f} | {r['vs_run']:+.2%} |" for r in doc["exports"]]
    Path(path).write_text("\n".join(lines) + "\n")


def plot(doc: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not doc["table2"]:  # a Table 3 subset (--parts table3 --runs ...): its markdown table says it all
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh([r["quant"] for r in doc["table2"]], [r["ppl"] for r in doc["table2"]], color="#4c72b0")
    for r in doc["loftq"]:
        a.axvline(r["ppl"], ls="--", color="#c44e52" if r["r"] == 64 else "#dd8452", label=f"LoftQ r={r['r']} step 0")
    a.set_xlabel("held-out perplexity (lower is better)")
    a.set_title("Base model under each quantization")
    a.legend(fontsize=8)
    a.invert_yaxis()
    b.barh([r["run"] for r in doc["table3"]], [r["heldout_loss"] for r in doc["table3"]], color="#55a868")
    if doc["table3"]:
        lo = min(r["heldout_loss"] for r in doc["table3"])
        b.set_xlim(lo * 0.97, max(r["heldout_loss"] for r in doc["table3"]) * 1.01)
    b.set_xlabel("held-out loss after the same fine-tune")
    b.set_title(f"{doc['steps']} steps, r 16")
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
