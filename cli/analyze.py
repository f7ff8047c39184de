"""`qlora-kit analyze`: what the adapter learned, per module (LoRA paper section 7): spectrum, stable rank,
amplification of the base's directions, subspace similarity with another adapter. Table, JSON, PNG."""

from __future__ import annotations

import json
import re

import click

from qlora_kit.cli.options import NonEmptyPath

from qlora_kit.analysis import analyze as an
from qlora_kit.terms import QUANT_TYPES


def _num(x, spec: str = "#.3g") -> str:
    return "-" if x is None else format(x, spec)


def _short(name: str) -> str:
    """model.layers.3.self_attn.q_proj -> self_attn.q_proj (the layer has its own column)."""
    m = re.search(r"\.\d+\.(.+)$", name)
    return m.group(1) if m else name


def _columns(report: an.Report) -> list[tuple[str, str, str]]:
    """(header, dict key, format) of the numeric columns present in this report."""
    cols = [("|dW|_F", "delta_norm", "#.3g"), ("stable", "stable_rank", ".2f"), ("r90", "rank_90", "d"),
            ("r99", "rank_99", "d")]
    if report.base is not None:
        cols += [("|W|_F", "weight_norm", "#.3g"), ("|U'WV|_F", "projection_norm", "#.3g"),
                 ("amp", "amplification", "#.3g"), ("random", "random_baseline", "#.3g")]
    if report.compare is not None:
        cols += [("phi(1,1)", "similarity_top1", ".3f"), ("phi(r,r')", "similarity_full", ".3f")]
    return cols


def _table(rows: list[list[str]], right_from: int) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            .rstrip() for r in rows]


def _text(report: an.Report) -> list[str]:
    scales = sorted({m.scaling for m in report.modules})
    lines = [f"adapter {report.adapter} ({report.method}): r={report.r}, alpha={report.alpha:g}, scale "
             f"{'/'.join(f'{s:g}' for s in scales)}, {len(report.modules)} modules" if report.modules else
             f"adapter {report.adapter} ({report.method})"]
    if report.base is not None:
        q = report.quant
        how = ("weights as stored" if q["type"] == "none" and q["dtype"] is None else
               f"{q['dtype']} weights" if q["type"] == "none" else
               f"{q['type']}" + (f" blocksize {q['blocksize']}" if q["type"] != "int8" else "")
               + (" + double quant" if q["double_quant"] and q["type"] != "int8" else "")
               + f", dequantized to {q['compute_dtype']}")
        why = ("as in training, from the run's recipe" if q["source"] == "recipe" else
               "an adapter folder does not record its base's quantization; pass --quant nf4 if it was trained on a "
               "4-bit base" if q["type"] == "none" and q["dtype"] is None else "--quant")
        lines.append(f"base {report.base}: {how} ({why})")
    if report.compare is not None:
        lines.append(f"compare {report.compare}: r={report.compare_r}; phi from the right-singular vectors of A "
                     "(LoRA paper eq. 4)")
        for label, names in (("only in the adapter", report.only_in_adapter),
                             ("only in --compare", report.only_in_compare)):
            if names:
                lines.append(f"  {label}: {len(names)} modules, e.g. {', '.join(names[:3])}")
    lines += _ia3_text(report)
    if not report.modules:
        return lines
    cols = _columns(report)
    rows = [["layer", "module", "shape", "s1"] + [h for h, _, _ in cols]]
    for m in report.modules:
        d = m.to_dict()
        s1 = m.singular_values[0] if m.singular_values else None
        rows.append(["-" if m.layer is None else str(m.layer), _short(m.module), f"{m.shape[0]}x{m.shape[1]}",
                     _num(s1)] + [_num(d[k], f) for _, k, f in cols])
    lines += [""] + _table(rows, right_from=3)
    rows = [["type", "n"] + [h for h, _, _ in cols]]
    for agg in report.by_type():  # ranks are means over layers here, so show them with a decimal
        rows.append([agg["kind"], str(agg["count"])] + [_num(agg[k], ".1f" if f == "d" else f) for _, k, f in cols])
    lines += ["", "by module type (mean over layers):"] + _table(rows, right_from=1)
    mags = [(m, m.magnitude) for m in report.modules if m.magnitude is not None]
    if mags:  # DoRA: how far the magnitude moved from the base's row norms (where it started)
        key = "max_abs_rel_change" if "max_abs_rel_change" in mags[0][1] else None
        rows = [["layer", "module", "m mean", "m min", "m max"] + (["|m/|W|-1| mean", "max"] if key else [])]
        for m, g in mags:
            rows.append(["-" if m.layer is None else str(m.layer), _short(m.module)]
                        + [_num(g[k], "#.4g") for k in ("mean", "min", "max")]
                        + ([_num(g["mean_abs_rel_change"], ".2e"), _num(g[key], ".2e")] if key else []))
        lines += ["", "DoRA magnitude m per module" + (" (vs the base's row norms ||W_i||, its start):" if key
                                                         else " (pass a base to see its change):")]
        lines += _table(rows, right_from=2)
    if report.base is not None:
        lines += ["", "amp = ||dW||_F / ||U^T W V||_F with U, V the top singular directions of dW (LoRA paper 7.3); "
                  "random: the same for random directions"]
    return lines


@click.command()
@click.argument("path", metavar="ADAPTER_OR_RUN")
@click.option("--base", default=None,
              help="Base model folder or built-in name (default for a run: its recipe's model).")
@click.option("--no-base", is_flag=True, help="Skip the base (and the amplification) even for a run folder.")
@click.option("--quant", type=click.Choice(["auto", *QUANT_TYPES]), default="auto", show_default=True,
              help="How the base was quantized in training. auto: a run's recipe; none for a bare adapter folder "
                   "(adapter_config.json does not record it).")
@click.option("--blocksize", type=int, default=64, show_default=True, help="With --quant nf4/fp4.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="With --quant nf4/fp4.")
@click.option("--compare", default=None, metavar="OTHER", help="Another adapter or run (other rank or seed): subspace "
              "similarity of the A matrices per module.")
@click.option("--modules", "pattern", default=None, metavar="REGEX", help="Only modules whose full name matches.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random-direction baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--plot", "plot_dir", default=None, metavar="DIR", type=NonEmptyPath(dir_okay=True),
              help="Write spectrum / amplification / similarity PNGs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the base is quantized, as in training (auto: CUDA when present).")
def command(path, base, no_base, quant, blocksize, double_quant, compare, pattern, seed, as_json, plot_dir, device):
    """Analyse a LoRA adapter (LoRA paper section 7): per module, the singular values of dW = s * B @ A, stable rank,
    the ranks holding 90% / 99% of its energy; with a base, how much dW amplifies directions of W; with --compare,
    how much the top subspaces of two adapters overlap."""
    if no_base and base is not None:
        raise click.UsageError("--base and --no-base exclude each other.")
    if plot_dir is not None:  # before the analysis (minutes on a large base), not after it
        from qlora_kit.analysis.plots import require

        require()
    report = an.analyze(path, base=base, use_base=not no_base, quant=quant, blocksize=blocksize,
                        double_quant=double_quant, compare=compare, modules=pattern, seed=seed, device=device)
    plots = []
    if plot_dir is not None:
        from qlora_kit.analysis.plots import write_plots

        plots = [str(p) for p in write_plots(report, plot_dir)]
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "plots": plots}, allow_nan=False))
        return
    for line in _text(report):
        click.echo(line)
    for p in plots:
        click.echo(f"wrote {p}")


def _ia3_text(report: an.Report) -> list[str]:
    """IA3's learned scales per module: their distribution around 1 (untrained: all 1)."""
    if not report.ia3:
        return []
    rows = [["layer", "module", "scales", "n", "mean", "std", "min", "p05", "median", "p95", "max", "|l-1| mean"]]
    for d in report.ia3:
        rows.append(["-" if d["layer"] is None else str(d["layer"]), _short(d["module"]), d["scales"], str(d["n"])]
                    + [_num(d[k], ".4f") for k in ("mean", "std", "min", "p05", "median", "p95", "max")]
                    + [_num(d["mean_abs_dev"], ".2e")])
    return ["", f"ia3: {len(report.ia3)} modules, learned scale l per channel (1 = unchanged)"] + _table(rows, 3)
