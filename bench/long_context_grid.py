"""Long context (issue 10): estimate vs measured live tensors on the CPU, seq 1k-8k, options off and all on.

    python bench/long_context_grid.py --runs bench/results/long_context_runs --out bench/results

Reads one `python -m qlora_kit.memory_measure --json` object per file (each run its own process, e.g.
`python -m qlora_kit.memory_measure --json --batch 1 --steps 2 --threads 1 --seq 2048 --replay-dropout 0` for "no
options", `... --offload-activations 1 --mlp-chunk 1024` for every option on) and writes
long_context_grid.{json,md,png}. Cells of the grid with no run file are listed as missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEQS = (1024, 2048, 4096, 8192)
NO_OPTIONS = "no options (nn.Dropout copies, no tiling, no offload)"
ALL_ON = "every option on (replayed dropout, tiled MLP 1024, offload)"


def option_of(c: dict) -> str | None:
    if not c["replay_dropout"] and not c["offload_activations"] and not c["mlp_chunk"]:
        return NO_OPTIONS
    if c["replay_dropout"] and c["offload_activations"] and c["mlp_chunk"] == 1024:
        return ALL_ON
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(HERE / "results" / "long_context_runs"))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    rows = []
    for f in sorted(Path(args.runs).glob("*.json")):
        r = json.loads(f.read_text())
        option = option_of(r["config"])
        if option is None or r["config"]["batch"] != 1:
            continue
        rows.append({"option": option, "seq": r["config"]["seq"], "file": f.name, "measured_bytes": r["peak_bytes"],
                     "estimate_bytes": r["estimate_total"], "error": r["error"],
                     "host_measured": r["host"]["offloaded_activations"],
                     "host_estimate": r["estimate_host"].get("offloaded_activations", 0) if r["estimate_host"] else 0,
                     "threads": r["config"]["threads"]})
    rows.sort(key=lambda r: (r["option"] != NO_OPTIONS, r["seq"]))
    have = {(r["option"], r["seq"]) for r in rows}
    missing = [f"{o} @ seq {s}" for o in (NO_OPTIONS, ALL_ON) for s in SEQS if (o, s) not in have]
    out = Path(args.out)
    (out / "long_context_grid.json").write_text(json.dumps({"rows": rows, "missing": missing}, indent=1) + "\n")
    lines = ["# Long context: estimate vs measured live tensors at the step peak (CPU, smollm2-135m)", "",
             "Batch 1, r=16 all-linear, dropout 0.05, nf4; one process per cell (`python -m qlora_kit.memory_measure "
             "--json --batch 1 --steps 2 --threads T --seq S` + `--replay-dropout 0` or `--offload-activations 1 "
             "--mlp-chunk 1024`); memory numbers do not depend on load. Machine: 2-core AMD EPYC CPU VM, 23.5 GiB, "
             "shared with other jobs. Error = estimate / measured - 1 (target: within 2%).", "",
             "| option | seq | measured (MiB) | estimate (MiB) | error | offloaded to host: measured / estimate (MiB) "
             "| run file |", "|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        host = (f"{r['host_measured'] / 2**20:.1f} / {r['host_estimate'] / 2**20:.1f}" if r["host_measured"]
                or r["host_estimate"] else "-")
        lines.append(f"| {r['option']} | {r['seq']} | {r['measured_bytes'] / 2**20:.1f} | "
                     f"{r['estimate_bytes'] / 2**20:.1f} | {r['error']:+.2%} | {host} | {r['file']} |")
    lines += ["", "Missing cells (not run in the time available): " + ("; ".join(missing) if missing else "none") + "."]
    (out / "long_context_grid.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for option, color in ((NO_OPTIONS, "tab:red"), (ALL_ON, "tab:blue")):
            sel = [r for r in rows if r["option"] == option]
            if not sel:
                continue
            xs = [r["seq"] for r in sel]
            ax.plot(xs, [r["measured_bytes"] / 2**20 for r in sel], "o-", color=color, label=f"{option}: measured")
            ax.plot(xs, [r["estimate_bytes"] / 2**20 for r in sel], "x--", color=color, label="estimate")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_ylabel("device-resident live tensors at peak (MiB)")
        ax.set_title("smollm2-135m QLoRA step on the CPU: estimate vs measured")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "long_context_grid.png", dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
