"""PNG charts for `qlora-kit analyze` (matplotlib: the optional `plot` extra, imported only here).

    spectrum.png               per module type, mean over layers: normalised singular values s_i / s_1 (log y),
                               and the cumulative energy sum(s[:k]^2) / sum(s^2) with the 90% / 99% lines
    amplification.png          per layer and module type: ||dW||_F / ||U^T W V||_F, dashed: the random baseline
    similarity_<type>.png      phi(i, j) against the --compare adapter (LoRA paper, Figure 3), mean over layers

Figures are built with `matplotlib.figure.Figure` (Agg canvas, no pyplot, no global backend state) and written to a
temporary name, then renamed, so a crash never leaves a half-written PNG.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import QloraKitError


def require() -> None:
    """QloraKitError unless matplotlib imports: checked before any analysis runs or any folder is made."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise QloraKitError("--plot needs matplotlib: pip install 'qlora-kit[plot]'.") from None


def _figure(*args, **kwargs):
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    with atomic.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _by_kind(report) -> dict[str, list]:
    kinds: dict[str, list] = {}
    for m in report.modules:
        kinds.setdefault(m.kind, []).append(m)
    return kinds


def _spectrum(report, folder: Path) -> Path:
    fig = _figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for kind, mods in _by_kind(report).items():
        k = max(len(m.singular_values) for m in mods)
        norm = np.full((len(mods), k), np.nan)  # (layers, k): s_i / s_1, NaN where absent or zero
        energy = np.full((len(mods), k), np.nan)
        for row, m in enumerate(mods):
            s = np.asarray(m.singular_values, dtype=np.float64)
            if s.size == 0 or s[0] <= 0:
                continue
            norm[row, :s.size] = np.where(s > 0, s / s[0], np.nan)
            energy[row, :s.size] = np.cumsum(s**2) / np.sum(s**2)
        if np.all(np.isnan(norm)):
            continue
        x = np.arange(1, k + 1)
        with warnings.catch_warnings():  # 'Mean of empty slice' for an index absent in every layer: a gap
            warnings.simplefilter("ignore", RuntimeWarning)
            ax1.plot(x, np.nanmean(norm, axis=0), marker="o", ms=3, label=f"{kind} ({len(mods)})")
            ax2.plot(x, np.nanmean(energy, axis=0), marker="o", ms=3, label=kind)
    ax1.set_yscale("log")
    ax1.set(xlabel="index i", ylabel="s_i / s_1 (mean over layers)", title="singular values of dW")
    ax2.axhline(0.9, color="grey", ls=":", lw=1)
    ax2.axhline(0.99, color="grey", ls="--", lw=1)
    ax2.set(xlabel="k", ylabel="sum(s[:k]^2) / sum(s^2)", title="cumulative energy (90% / 99% lines)", ylim=(0, 1.02))
    ax1.legend(fontsize=8)
    _integer_ticks(ax1, ax2)
    return _save(fig, folder / "spectrum.png")


def _amplification(report, folder: Path) -> Path | None:
    fig = _figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for kind, mods in _by_kind(report).items():
        pts = [(m.layer, m.base["amplification"], m.base["random_baseline"]) for m in mods
               if m.layer is not None and m.base is not None and m.base["amplification"] is not None]
        if not pts:
            continue
        layers, amp, rand = zip(*pts)
        (line,) = ax.plot(layers, amp, marker="o", ms=3, label=kind)
        ax.plot(layers, [np.nan if r is None else r for r in rand], ls="--", lw=1, color=line.get_color())
        drawn = True
    if not drawn:
        return None
    ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="||dW||_F / ||U^T W V||_F",
           title="amplification per layer (dashed: random directions)")
    ax.legend(fontsize=8)
    _integer_ticks(ax)
    return _save(fig, folder / "amplification.png")


def _similarity(report, folder: Path) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    out = []
    for kind, mods in _by_kind(report).items():
        grids = [np.asarray(m.similarity) for m in mods if m.similarity is not None]
        grids = [g for g in grids if grids and g.shape == grids[0].shape]
        if not grids:
            continue
        g = np.mean(grids, axis=0)  # (r1, r2)
        fig = _figure(figsize=(min(12, 4 + 0.2 * g.shape[1]), min(10, 3.5 + 0.2 * g.shape[0])), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", origin="upper", aspect="auto",
                       extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5))
        fig.colorbar(im, ax=ax, label="phi(i, j)")
        ax.set(xlabel=f"j: top directions of {Path(report.compare).name} (r={report.compare_r})",
               ylabel=f"i: top directions of {Path(report.adapter).name} (r={report.r})",
               title=f"phi(i, j) of A, {kind}\n(mean over {len(grids)} layers)")
        _integer_ticks(ax)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        out.append(_save(fig, folder / f"similarity_{re.sub(r'[^A-Za-z0-9_.-]', '_', kind)}.png"))
    return out


def write_plots(report, folder: str | Path) -> list[Path]:
    """Write the charts of an analyze.Report into `folder` (created); returns the files written."""
    require()  # before the folder exists: a refused --plot leaves nothing behind
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise QloraKitError(f"--plot {folder} is a file; pass a folder for the PNGs.")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_spectrum(report, folder)]
    if report.base is not None:
        amp = _amplification(report, folder)
        paths += [amp] if amp is not None else []
    if report.compare is not None:
        paths += _similarity(report, folder)
    return paths
