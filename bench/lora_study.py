"""LoRA study on the bundled SmolLM2-135M (CPU, minutes): which weights to adapt, and with what rank?

The LoRA paper's Table 5 (which weight matrices, under one parameter budget) and Table 6 / Figure 3 (which rank;
how much do the subspaces of r=8 and r=64 overlap) asked again of our demo model and data (Hu et al. 2021,
arXiv 2106.09685, section 7). Every cell trains recipes/study/lora_study.yaml with `--set` overrides, each in its
own fresh `qlora-kit train` process, with OMP_NUM_THREADS set and OMP_WAIT_POLICY=PASSIVE (docs/ARCHITECTURE.md,
"Benchmarks").

    rank sweep     q+v at r = 1, 2, 4, 8, 64
    fixed budget   per layer: q 1152r, k 768r, v 768r, o 1152r, gate/up/down 2112r each, so
                   q+v r=8 (15,360) = q,k,v,o r=4 (15,360) ~ all-linear r=2 (20,352: 1.33x) / r=1 (10,176: 0.66x)

    python bench/lora_study.py                    # train the grid (runs/study/<cell>/), analyse, write results
    python bench/lora_study.py --table-only       # rewrite study.md / study.png / study_similarity.png from JSON
    python bench/lora_study.py --only qv-r1 qv-r2 --steps 10 --runs /tmp/study --results /tmp/res   # a quick check

Writes bench/results/study.json, study.md (table: targets, r, trainable params, val / train loss, wall time; the
machine and the command), study.png (val loss vs rank per target set; the fixed-budget bars) and
study_similarity.png (phi(A_r8, A_r64, i, j) of q_proj and v_proj, mean over layers: the paper's Figure 3).
A cell whose run folder already holds summary.json is not retrained (delete it, or pass --force).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QV, ATTN = ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]
PER_LAYER = {"q_proj": 1152, "k_proj": 768, "v_proj": 768, "o_proj": 1152, "gate_proj": 2112, "up_proj": 2112,
             "down_proj": 2112}  # SmolLM2-135M adapter params per layer per unit of rank: r * (in + out)
BUDGET = (PER_LAYER["q_proj"] + PER_LAYER["v_proj"]) * 8  # q+v at r=8: 15,360 per layer


@dataclass(frozen=True)
class Cell:
    id: str
    label: str  # the target set as the table shows it
    targets: list[str] | str
    r: int
    groups: tuple[str, ...]  # "rank", "budget", "methods"
    extra: tuple[str, ...] = ()  # more --set overrides (DoRA, IA3, LoRA+)
    extra_per_layer: int = 0  # parameters per layer beyond LoRA's r * (in + out): DoRA's m, IA3's l

    @property
    def per_layer(self) -> int:
        mods = PER_LAYER if self.targets == "all-linear" else {k: PER_LAYER[k] for k in self.targets}
        return sum(mods.values()) * self.r + self.extra_per_layer

    def overrides(self) -> list[str]:
        t = self.targets if isinstance(self.targets, str) else "[" + ",".join(self.targets) + "]"
        return [f"lora.targets={t}", f"lora.r={self.r}", *self.extra]


GRID = [Cell(f"qv-r{r}", "q,v", QV, r, ("rank", "budget") if r == 8 else ("rank",)) for r in (1, 2, 4, 8, 64)] + [
    Cell("attn-r4", "q,k,v,o", ATTN, 4, ("budget",)),
    Cell("all-r1", "all-linear", "all-linear", 1, ("budget",)),
    Cell("all-r2", "all-linear", "all-linear", 2, ("budget",)),
    # Adapter methods under the q+v r=8 budget. SmolLM2 per layer: out of q,k,v,o,gate,up,down = 576, 192, 192,
    # 576, 1536, 1536, 576 (DoRA's m: 5,184 in all); IA3's l: k 192 + v 192 + down's input 1536 = 1,920.
    Cell("m-lora", "LoRA all-linear", "all-linear", 1, ("methods",)),
    Cell("m-dora", "DoRA all-linear", "all-linear", 1, ("methods",), ("lora.dora=true",), 5184),
    Cell("m-loraplus", "LoRA+ (ratio 16) all-linear", "all-linear", 1, ("methods",), ("lora.plus_ratio=16",)),
    Cell("m-ia3", "IA3 (k,v out; down in)", [], 1, ("methods",), ("ia3.outputs=[k_proj,v_proj]",), 1920),
    Cell("m-lora-ia3", "LoRA q,k,v,o + IA3 MLP (up out; down in)", ATTN, 3, ("methods",),
         ("ia3.outputs=[up_proj]", "ia3.inputs=[down_proj]"), 3072),
]


# ---- training ------------------------------------------------------------------------------------------------------


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _suffix(seed: int) -> str:
    return "" if seed == 0 else f"-s{seed}"


def train_cell(cell: Cell, seed: int, args) -> dict:
    """Train one cell with one seed (a fresh `qlora-kit train` process) -> its numbers."""
    run, tag = Path(args.runs) / f"{cell.id}{_suffix(seed)}", f"{cell.id} seed {seed}"
    if (run / "summary.json").is_file() and not args.force:
        print(f"[{tag}] done before: {run}", flush=True)
    else:
        if run.exists():
            shutil.rmtree(run)
        sets = [*cell.overrides(), *args.set, f"train.seed={seed}", f"train.num_threads={args.threads}"]
        cmd = [sys.executable, "-m", "qlora_kit.cli.main", "train", args.recipe,
               *(a for o in sets for a in ("--set", o)), "--out", str(run), "--no-progress"]
        print(f"[{tag}] {shlex.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=_env(args.threads), capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"[{tag}] failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        (run / "process_wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = [m["loss"] for m in metrics[-5:]]
    wall = (run / "process_wall_s.txt").read_text().strip() if (run / "process_wall_s.txt").is_file() else None
    out = {"seed": seed, "run": str(run), "trainable_params": summary["trainable_params"],
           "val_loss": summary["val_loss"], "train_loss_last5": sum(tail) / len(tail),
           "final_loss": summary["final_loss"], "val_curve": [(m["step"], m["val_loss"]) for m in metrics
                                                              if "val_loss" in m],
           "train_wall_s": summary["wall_s"], "process_wall_s": float(wall) if wall else None,
           "tokens_per_s": summary["tokens_per_s"], "peak_memory_bytes": summary["peak_memory_bytes"]}
    print(f"[{tag}] val {out['val_loss']:.4f}, {out['trainable_params']:,} params, {out['train_wall_s']} s",
          flush=True)
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def cell_row(cell: Cell, runs: list[dict], base: dict[int, float]) -> dict:
    """One table row: the cell and the mean over its seeds (each seed's numbers kept under `seeds`)."""
    return {"id": cell.id, "targets": cell.label, "r": cell.r, "groups": list(cell.groups), "per_layer": cell.per_layer,
            "budget_ratio": round(cell.per_layer / BUDGET, 3), "trainable_params": runs[0]["trainable_params"],
            "val_loss": _mean([x["val_loss"] for x in runs]),
            "gain": [base[x["seed"]] - x["val_loss"] for x in runs],  # per seed: base val loss - val loss
            "train_loss_last5": _mean([x["train_loss_last5"] for x in runs]),
            "train_wall_s": _mean([x["train_wall_s"] for x in runs]), "seeds": runs}


def base_val_loss(seed: int, args) -> float:
    """The base model's validation loss (the untrained adapter: B = 0) on this seed's validation split, in its own
    process like the cells."""
    out = Path(args.runs) / f"base_val_loss{_suffix(seed)}.json"
    if not out.is_file() or args.force:
        code = ("import json, sys; from qlora_kit.train import loop as train; "
                "from qlora_kit.config import load_recipe; "
                "r = load_recipe(sys.argv[1], sys.argv[2:]); p = train.prepare(r); "
                "print(json.dumps(train.evaluate(p, p.dataset.val, r.train.batch_size)))")
        res = subprocess.run([sys.executable, "-c", code, args.recipe, *args.set, f"train.seed={seed}",
                              f"train.num_threads={args.threads}"], cwd=ROOT, env=_env(args.threads),
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"[base seed {seed}] failed:\n{res.stderr[-3000:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(res.stdout.strip().splitlines()[-1] + "\n")
    return float(json.loads(out.read_text()))


def similarity(runs: Path) -> dict | None:
    """analyze(q+v r=8, --compare q+v r=64): phi per module; the grid mean over layers per module type."""
    from qlora_kit.analysis import analyze

    r8, r64 = runs / "qv-r8", runs / "qv-r64"
    if not ((r8 / "adapter").is_dir() and (r64 / "adapter").is_dir()):
        return None
    rep = analyze.analyze(r8, use_base=False, compare=r64)
    out = {"adapter": str(r8), "compare": str(r64), "by_type": rep.by_type(), "grids": {},
           "layers": len({m.layer for m in rep.modules})}
    for kind in sorted({m.kind for m in rep.modules}):
        grids = [m.similarity for m in rep.modules if m.kind == kind]
        out["grids"][kind] = [[sum(g[i][j] for g in grids) / len(grids) for j in range(len(grids[0][0]))]
                              for i in range(len(grids[0]))]  # (8, 64): mean over layers
    spec = {}
    for path in (r8, r64):  # how much of each adapter's rank is used (stable rank, rank holding 90% of the energy)
        spec[path.name] = analyze.analyze(path, use_base=False).by_type()
    out["spectrum"] = spec
    return out


# ---- table and plots -----------------------------------------------------------------------------------------------


def _machine(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def write_md(res: dict, path: Path) -> None:
    rows, base, seeds = res["rows"], res["base_val_loss"], res["seeds"]
    lines = [
        "# LoRA study: target sets and ranks on SmolLM2-135M (NF4 QLoRA, CPU)", "",
        "Made by `" + res["command"] + "` (tables and plots again, without training: "
        "`python bench/lora_study.py --table-only`).", "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores shared with other jobs, "
        f"{res['machine']['threads']} threads per run; torch {res['machine']['torch']}, Python "
        f"{res['machine']['python']}. Date: {res['date']}.", "",
        f"Recipe `{res['recipe']}`{' with ' + ' '.join('--set ' + s for s in res['set']) if res['set'] else ''}: "
        f"{res['recipe_summary']}.", "",
        f"Seeds {', '.join(map(str, seeds))}: train.seed sets the adapter init, the batch order AND the 20-record "
        "validation split, so the per-seed columns show init and split noise together. Numbers are means over seeds.",
        "", f"Base model without adapter: val loss **{base:.4f}** (per seed: "
        f"{', '.join(f'{float(v):.4f}' for v in res['base_val_loss_by_seed'].values())}).", "",
        "| cell | targets | r | params / layer | budget | trainable params | val loss | val loss per seed | "
        "train loss (last 5) | train wall s |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        per_seed = " / ".join(f"{x['val_loss']:.4f}" for x in r["seeds"])
        lines.append(f"| {r['id']} | {r['targets']} | {r['r']} | {r['per_layer']:,} | {r['budget_ratio']:.2f}x | "
                     f"{r['trainable_params']:,} | **{r['val_loss']:.4f}** | {per_seed} | "
                     f"{r['train_loss_last5']:.4f} | {r['train_wall_s']:.0f} |")
    budget = sorted((r for r in rows if "budget" in r["groups"]), key=lambda r: r["val_loss"])
    sweep = sorted((r for r in rows if "rank" in r["groups"]), key=lambda r: r["r"])
    lines += ["", "Budget = params per layer over q+v at r=8 (15,360 per layer, 460,800 in all over 30 layers).",
              "Val loss: mean per response token over the 20 held-out records (paraphrased questions about the same "
              "ten facts), at the last step. Train loss: mean of the last 5 steps' batch losses. Wall time: the "
              "training loop of one run (model loading excluded), on a CPU shared with other jobs: compare with care.",
              "",
              "## Fixed budget (Table 5)", "",
              "Best to worst: " + ", ".join(f"{r['targets']} r={r['r']} ({r['val_loss']:.4f}, {r['budget_ratio']:.2f}x)"
                                            for r in budget) + ".", "",
              "## Rank sweep, q+v (Table 6)", "",
              "Val loss by rank: " + ", ".join(f"r={r['r']}: {r['val_loss']:.4f}" for r in sweep) + ".", ""]
    methods = sorted((r for r in rows if "methods" in r["groups"]), key=lambda r: r["val_loss"])
    if methods:
        lines += ["## Methods under one budget (DoRA, IA3, LoRA+, LoRA+IA3)", "",
                  "| method | trainable params | budget | val loss | train loss (last 5) | tokens/s "
                  "| step time vs LoRA |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        ref = next((r for r in rows if r["id"] == "m-lora"), None)
        for r in methods:
            tps = _mean([x["tokens_per_s"] for x in r["seeds"]])
            rel = f"{r['train_wall_s'] / ref['train_wall_s']:.2f}x" if ref else "-"
            lines.append(f"| {r['targets']} (r={r['r']}) | {r['trainable_params']:,} | {r['budget_ratio']:.2f}x | "
                         f"**{r['val_loss']:.4f}** | {r['train_loss_last5']:.4f} | {tps:.0f} | {rel} |")
        lines += ["", "Step time vs LoRA: the training loop's wall time over LoRA all-linear r=1's, the cells run one "
                  "after another on the same shared CPU (so a ratio, not an absolute time).", ""]
    sim = res.get("similarity")
    if sim:
        lines += ["## Subspace similarity of r=8 and r=64 (Figure 3)", "",
                  "phi(A_r8, A_r64, i, j) = ||V8[:, :i]^T V64[:, :j]||_F^2 / min(i, j) from the right-singular vectors "
                  "of the A matrices (`qlora-kit analyze runs/study/qv-r8 --compare runs/study/qv-r64`), mean over the "
                  f"{sim.get('layers', '?')} layers; `study_similarity.png`. For comparison, two random subspaces of "
                  "dimension i and j in 576 dimensions have phi ~ max(i, j) / 576.", "",
                  "| module | phi(1, 1) | phi(8, 64) | stable rank r=8 | stable rank r=64 | rank_90 r=8 | "
                  "rank_90 r=64 |", "|---|--:|--:|--:|--:|--:|--:|"]
        spec8 = {d["kind"]: d for d in sim["spectrum"]["qv-r8"]}
        spec64 = {d["kind"]: d for d in sim["spectrum"]["qv-r64"]}
        for d in sim["by_type"]:
            k = d["kind"]
            lines.append(f"| {k} | {d['similarity_top1']:.3f} | {d['similarity_full']:.3f} | "
                         f"{spec8[k]['stable_rank']:.2f} | {spec64[k]['stable_rank']:.2f} | "
                         f"{spec8[k]['rank_90']:.1f} | {spec64[k]['rank_90']:.1f} |")
        lines.append("")
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    path.write_text("\n".join(lines))


def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def write_plots(res: dict, folder: Path) -> list[Path]:
    rows, base = res["rows"], res["base_val_loss"]
    fig = _figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for label, marker in (("q,v", "o"), ("q,k,v,o", "s"), ("all-linear", "^")):
        mine = sorted((r for r in rows if r["targets"] == label), key=lambda r: r["r"])
        if mine:  # the mean over seeds, the bar spanning the seeds' lowest and highest
            vals = [[x["val_loss"] for x in r["seeds"]] for r in mine]
            mean = [r["val_loss"] for r in mine]
            err = [[m - min(v) for m, v in zip(mean, vals)], [max(v) - m for m, v in zip(mean, vals)]]
            ax1.errorbar([r["r"] for r in mine], mean, yerr=err, marker=marker, capsize=3, label=label)
    ax1.axhline(base, color="grey", ls="--", lw=1, label=f"base, no adapter ({base:.2f})")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")  # 0.02 (all-linear) to 2.7 (base): every curve readable
    ax1.set(xlabel="rank r", ylabel="validation loss", title=f"validation loss vs rank, per target set\n"
            f"(mean of {len(res['seeds'])} seeds, bars: min-max)")
    ax1.legend(fontsize=8)
    budget = [r for r in rows if "budget" in r["groups"]]
    names = [f"{r['targets']}\nr={r['r']} ({r['budget_ratio']:.2f}x)" for r in budget]
    vals = [r["val_loss"] for r in budget]
    err = [[v - min(x["val_loss"] for x in r["seeds"]) for v, r in zip(vals, budget)],
           [max(x["val_loss"] for x in r["seeds"]) - v for v, r in zip(vals, budget)]]
    bars = ax2.bar(names, vals, yerr=err, capsize=3,
                   color=[{"q,v": "C0", "q,k,v,o": "C1"}.get(r["targets"], "C2") for r in budget])
    for b, r, up in zip(bars, budget, err[1]):
        ax2.annotate(f"{r['val_loss']:.3f}\n{r['trainable_params'] / 1e3:.0f}k params",
                     (b.get_x() + b.get_width() / 2, b.get_height() + up), ha="center", va="bottom", fontsize=8)
    ax2.set(ylabel="validation loss", ylim=(0, max(vals) * 1.3),
            title=f"fixed budget: q+v r=8 = 15,360 params / layer\n(lower is better; base without adapter: {base:.2f})")
    ax2.tick_params(axis="x", labelsize=8)
    out = [folder / "study.png"]
    fig.savefig(out[0], dpi=110)
    sim = res.get("similarity")
    if sim:
        import numpy as np

        kinds = sorted(sim["grids"])
        fig = _figure(figsize=(12, 2.4 * len(kinds) + 0.6), layout="constrained")
        axes = fig.subplots(len(kinds), 2, squeeze=False, width_ratios=[3, 1])
        for row, kind in zip(axes, kinds):
            g = np.asarray(sim["grids"][kind])  # (8, 64)
            for ax, cols in zip(row, (g.shape[1], g.shape[0])):
                sub = g[:, :cols]
                im = ax.imshow(sub, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                               extent=(0.5, sub.shape[1] + 0.5, sub.shape[0] + 0.5, 0.5))
                ax.set(xlabel="j (A, r=64)", ylabel="i (A, r=8)", title=f"{kind}: phi(i, j), j <= {cols}")
            fig.colorbar(im, ax=row[-1])
        fig.suptitle(f"subspace similarity of q+v adapters r=8 vs r=64, mean over {sim.get('layers', '?')} layers "
                     "(LoRA paper Fig. 3)")
        out.append(folder / "study_similarity.png")
        fig.savefig(out[-1], dpi=110)
    return out


# ---- main ----------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="recipes/study/lora_study.yaml")
    ap.add_argument("--runs", default="runs/study", help="folder for the run folders (one per cell)")
    ap.add_argument("--results", default="bench/results", help="where study.json / .md / .png go")
    ap.add_argument("--only", nargs="+", metavar="CELL", choices=[c.id for c in GRID], help="train only these cells")
    ap.add_argument("--steps", type=int, help="override train.steps (and eval_every = steps / 4)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="another recipe override for every cell")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="train.seed of each repeat (it seeds the "
                    "adapter init, the batch order and the validation split)")
    ap.add_argument("--threads", type=int, default=2, help="OMP / torch threads per run")
    ap.add_argument("--force", action="store_true", help="retrain cells that already have a summary.json")
    ap.add_argument("--table-only", action="store_true", help="rewrite md and png from study.json; no training")
    ap.add_argument("--note", action="append", default=[], help="a line for the Notes section of study.md")
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        res = json.loads((results / "study.json").read_text())
        res["notes"] = res.get("notes", []) + [n for n in args.note if n not in res.get("notes", [])]
        (results / "study.json").write_text(json.dumps(res, indent=1) + "\n")
    else:
        if args.steps:
            args.set += [f"train.steps={args.steps}", f"train.eval_every={max(1, args.steps // 4)}"]
        from qlora_kit.config import load_recipe

        recipe = load_recipe(ROOT / args.recipe, args.set)
        t0 = time.perf_counter()
        cells = [c for c in GRID if not args.only or c.id in args.only]
        base = {seed: base_val_loss(seed, args) for seed in args.seeds}
        runs = {(c.id, seed): train_cell(c, seed, args) for seed in args.seeds for c in cells}  # seed by seed
        rows = [cell_row(c, [runs[c.id, seed] for seed in args.seeds], base) for c in cells]
        t = recipe.train
        res = {"command": shlex.join(["python", "bench/lora_study.py", *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(args.threads), "recipe": args.recipe,
               "set": args.set, "recipe_summary": f"{recipe.quant.type} base, {recipe.quant.compute_dtype} adapters, "
               f"alpha {recipe.lora.alpha:g} (scale alpha/r), dropout {recipe.lora.dropout:g}, {t.steps} steps x "
               f"batch {t.batch_size}, lr {t.lr:g} ({t.schedule}, {t.warmup_steps} warmup), max_length "
               f"{recipe.data.max_length}, val_fraction {recipe.data.val_fraction:g}, seed {t.seed}",
               "seeds": args.seeds, "base_val_loss": _mean(list(base.values())),
               "base_val_loss_by_seed": base, "rows": rows, "similarity": similarity(Path(args.runs)),
               "grid_wall_s": round(time.perf_counter() - t0, 1), "notes": args.note}
        (results / "study.json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, results / "study.md")
    plots = write_plots(res, results) if any({"rank", "budget"} & set(r["groups"]) for r in res["rows"]) else []
    for p in [results / "study.md", *plots]:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
