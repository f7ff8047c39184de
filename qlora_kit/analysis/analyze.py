"""What did the adapter learn? The analyses of the LoRA paper (Hu et al. 2021, arXiv 2106.09685, section 7) over a
trained adapter, per adapted module, from its update dW = s · B @ A (A (r, in), B (out, r), s = alpha / r):

    spectrum          the r singular values of dW; stable rank; the rank holding 90% / 99% of its energy
    amplification     ||dW||_F / ||U^T W V||_F against the base weight W (section 7.3, Table 7), and the same ratio
                      for random orthonormal directions as the baseline
    similarity        phi(A1, A2, i, j) against another adapter's A (section 7.2, eq. 4), a grid over i, j
    magnitude         DoRA: how far the trained magnitude m moved from its start, the base's row norms ||W_i||
    ia3               IA3: the distribution of each module's learned scales l (1 = unchanged)

Everything runs on the CPU in float64 (the base is read in float32, which holds bf16/fp16 values exactly). The base is
read one adapted weight at a time from safetensors, never as a whole model, and, for a run folder, dequantized
exactly as in training: dequant(quant(W)) in the recipe's compute dtype (quant.roundtrip), the weight the adapter was
trained against. bitsandbytes (through `quant`) is imported only when a quantized base is asked for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..adapters import dora, ia3, peft_format
from ..config import QuantConfig
from ..errors import ConfigError, ModelError
from ..device import resolve_device
from ..model.load import frozen_dtype, resolve, weight_files
from ..run.folder import adapter_source
from ..terms import BLOCKSIZES, QUANT_TYPES

RANK_TOL = 1e-6  # singular values below RANK_TOL * s_max count as zero (directions of a rank-deficient update)


# ---- the math: pure functions over tensors ---------------------------------------------------------------------


@dataclass(frozen=True)
class LowRankSVD:
    """Thin SVD of dW = U diag(s) V^T. s (k,) float64 descending; U (out, k), V (in, k) orthonormal columns;
    k = min(r, out, in). Singular vectors of zero singular values are an arbitrary orthonormal completion."""

    s: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor


def delta_svd(A: torch.Tensor, B: torch.Tensor, scale: float) -> LowRankSVD:
    """SVD of dW = scale · B @ A without forming the (out, in) matrix: B = Qb Rb and A^T = Qa Ra (reduced QR), so
    dW = Qb (scale · Rb Ra^T) Qa^T and the SVD of the small (r, r) core, Uc S Vc^T, gives U = Qb Uc, V = Qa Vc.
    Exact, and cheap even for 4096 x 14336 weights (O((out + in) r^2))."""
    Qb, Rb = torch.linalg.qr(B.double())  # (out, kb), (kb, r)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (in, ka), (ka, r)
    Uc, s, Vch = torch.linalg.svd(scale * Rb @ Ra.T, full_matrices=False)  # core (kb, ka)
    return LowRankSVD(s, Qb @ Uc, Qa @ Vch.T)


def stable_rank(s: torch.Tensor) -> float:
    """||dW||_F^2 / ||dW||_2^2 = sum(s^2) / max(s)^2, in [1, rank]; 0 for dW = 0."""
    return 0.0 if s.numel() == 0 or s[0] <= 0 else float((s**2).sum() / s[0] ** 2)


def energy_rank(s: torch.Tensor, p: float) -> int:
    """The smallest k with sum(s[:k]^2) >= p · sum(s^2) (s descending); 0 for dW = 0."""
    e = torch.cumsum(s.double() ** 2, 0)
    if e.numel() == 0 or e[-1] <= 0:
        return 0
    # relative slack of 1e-12 so that p = 1 and exact hand-built spectra are not lost to rounding
    return min(int((e < p * e[-1] * (1 - 1e-12)).sum()) + 1, e.numel())


def numerical_rank(s: torch.Tensor, rtol: float = RANK_TOL) -> int:
    return 0 if s.numel() == 0 or s[0] <= 0 else int((s > rtol * s[0]).sum())


def project(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, float]:
    """(U^T W V (k, k) float64, ||W||_F) with W (out, in) in any float dtype, taken in row chunks so a large weight
    is never held in float64 all at once."""
    acc = torch.zeros(U.shape[1], W.shape[1], dtype=torch.float64)  # (k, in)
    sq = 0.0
    for i in range(0, W.shape[0], chunk):
        w = W[i:i + chunk].double()  # (chunk, in)
        acc += U[i:i + chunk].T @ w
        sq += float((w * w).sum())
    return acc @ V, math.sqrt(sq)


def random_orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) float64 with orthonormal columns, uniformly (Haar) distributed: QR of a Gaussian, signs fixed."""
    Q, R = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)


def amplification(W: torch.Tensor, svd: LowRankSVD, seed: int = 0) -> dict:
    """The LoRA paper's feature amplification factor (section 7.3, Table 7): project W onto the r-dimensional
    subspace of dW, ||U^T W V||_F with U, V the top singular directions of dW; the factor is ||dW||_F over it. A
    large factor means dW amplifies directions that exist in W but are weak there. Only directions with a nonzero
    singular value (numerical_rank) are used, so a rank-1 update in a rank-8 adapter projects onto 1 direction.
    `random_baseline` is the same ratio for Haar-random orthonormal U, V of the same size (seeded: reproducible).
    Undefined ratios (dW = 0, or a projection of exactly 0) are None."""
    k = numerical_rank(svd.s)
    delta = float(svd.s.square().sum().sqrt())
    if k == 0:
        _, w_norm = project(W, svd.U[:, :0], svd.V[:, :0])
        return {"weight_norm": w_norm, "directions": 0, "projection_norm": 0.0, "amplification": None,
                "random_projection_norm": None, "random_baseline": None}
    proj, w_norm = project(W, svd.U[:, :k], svd.V[:, :k])
    gen = torch.Generator().manual_seed(seed)
    Ur, Vr = random_orthonormal(W.shape[0], k, gen), random_orthonormal(W.shape[1], k, gen)
    rproj, _ = project(W, Ur, Vr)
    p, rp = float(torch.linalg.matrix_norm(proj)), float(torch.linalg.matrix_norm(rproj))
    return {"weight_norm": w_norm, "directions": k, "projection_norm": p, "amplification": delta / p if p else None,
            "random_projection_norm": rp, "random_baseline": delta / rp if rp else None}


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Normalised subspace similarity of the LoRA paper (section 7.2, eq. 4), from the A matrices as there:

        phi(A1, A2, i, j) = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j)

    with V1, V2 the right-singular vectors of A1 (r1, in) and A2 (r2, in), i.e. of their row spaces in the input
    space, ordered by singular value. Returns the (r1, r2) float64 grid, cell [i-1, j-1] = phi(i, j), in [0, 1]:
    1 when one top subspace contains the other, 0 when they are orthogonal."""
    if A1.shape[1] != A2.shape[1]:
        raise ModelError(f"cannot compare subspaces of A with in_features {A1.shape[1]} and {A2.shape[1]}.")
    V1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh.T  # (in, r1)
    V2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh.T  # (in, r2)
    cum = ((V1.T @ V2) ** 2).cumsum(0).cumsum(1)  # (r1, r2): cell [i-1, j-1] = ||V1_i^T V2_j||_F^2
    i = torch.arange(1, cum.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, cum.shape[1] + 1, dtype=torch.float64)[None, :]
    return (cum / torch.minimum(i, j)).clamp(0.0, 1.0)


# ---- where the adapter and its base come from ------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """An adapter folder, and the run's recipe when it came from a run folder (RUN or RUN/adapter)."""

    adapter_dir: Path
    recipe: object | None  # config.Recipe


def locate(path: str | Path) -> Source:
    return Source(*adapter_source(path))


class BaseWeights:
    """The base weight of each adapted module, read one tensor at a time from a safetensors model folder.

    quant.type none: W as stored (dtype None), or cast to the frozen dtype training used (a run folder).
    nf4 / fp4 / int8: cast to the frozen dtype (`auto`: the checkpoint's 16-bit dtype, bf16 for fp32, as
    model.load_base does), quantized, dequantized to the compute dtype: the exact weight training multiplied by."""

    def __init__(self, folder: Path, quant: QuantConfig, dtype: str | None, device: torch.device | None = None):
        # device: where the weight is quantized and dequantized (training's device gives training's codes)
        self.folder, self.quant, self.dtype = folder, quant, dtype
        self.device = device or torch.device("cpu")
        files = [f for f in weight_files(folder) if f.suffix == ".safetensors"]
        if not files:
            raise ModelError(f"{folder} holds only pickle (.bin) weights; analyze reads safetensors only. "
                             "Convert the checkpoint to safetensors.")
        self.index: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    self.index |= dict.fromkeys(h.keys(), f)
            except (SafetensorError, OSError) as e:
                raise ModelError(f"{f} is truncated or not a safetensors file ({e}).") from None
        self.spec, self.transposed = None, None
        if quant.type != "none":
            from ..quant.bnb import QuantSpec  # imports bitsandbytes: only when a quantized base is asked for

            self.spec = QuantSpec.from_config(quant)

    def weight(self, module: str, shape: tuple[int, int]) -> torch.Tensor:
        """(out, in) float32 (exact for bf16/fp16/fp32 values)."""
        key = f"{module}.weight"
        if key not in self.index:
            raise ModelError(f"the base {self.folder} has no tensor {key} for the adapted module {module}; "
                             "is it the model the adapter was trained on? Pass the right one with --base.")
        with safe_open(str(self.index[key]), framework="pt") as h:
            w = h.get_tensor(key)
        if self.transposed is None:  # built once, on the first weight asked for
            from ..model.conv1d import layer_weights
            from ..model.load import load_config

            # a bare safetensors folder (no config.json) names no layer type: its weights are taken as stored
            folder = Path(self.folder)
            self.transposed = layer_weights(load_config(folder))[1] if (folder / "config.json").is_file() else set()
        if key in self.transposed:  # a Conv1D's (in, out): the (out, in) the adapter was trained against
            w = w.t()
        if tuple(w.shape) != shape:
            raise ModelError(f"{key} in {self.folder} has shape {tuple(w.shape)}, but the adapter's B @ A is "
                             f"{shape}; the adapter was trained on another model. Pass the right one with --base.")
        if self.dtype is not None:
            w = w.to(frozen_dtype(self.dtype, w.dtype))
        if self.spec is None:
            return w.float()
        from ..quant.bnb import roundtrip

        return roundtrip(w.to(self.device), self.spec, self.spec.compute_dtype).float().cpu()


# ---- the report ------------------------------------------------------------------------------------------------


@dataclass
class ModuleReport:
    module: str
    layer: int | None
    kind: str  # the module type: q_proj, v_proj, ...
    shape: tuple[int, int]  # (out, in)
    r: int
    scaling: float
    singular_values: list[float]
    stable_rank: float
    rank_90: int
    rank_99: int
    delta_norm: float  # ||dW||_F
    base: dict | None = None  # amplification() when a base is given
    similarity: list[list[float]] | None = None  # phi grid (r1, r2) when compared
    magnitude: dict | None = None  # DoRA: dora.magnitude_stats()

    def to_dict(self) -> dict:
        d = {"module": self.module, "layer": self.layer, "kind": self.kind, "shape": list(self.shape), "r": self.r,
             "scaling": self.scaling, "singular_values": self.singular_values, "stable_rank": self.stable_rank,
             "rank_90": self.rank_90, "rank_99": self.rank_99, "delta_norm": self.delta_norm}
        if self.base is not None:
            d |= self.base
        if self.similarity is not None:
            d |= {"similarity": self.similarity, "similarity_top1": self.similarity[0][0],
                  "similarity_full": self.similarity[-1][-1]}
        if self.magnitude is not None:
            d["magnitude"] = self.magnitude
        return d


@dataclass
class Report:
    adapter: str
    r: int
    alpha: float
    base: str | None = None
    quant: dict | None = None  # the base's quantization, and where it came from (recipe / option)
    compare: str | None = None
    compare_r: int | None = None
    modules: list[ModuleReport] = field(default_factory=list)
    only_in_adapter: list[str] = field(default_factory=list)  # with --compare: modules the other adapter lacks
    only_in_compare: list[str] = field(default_factory=list)
    method: str = "lora"  # lora | dora | ia3 | lora+ia3 | dora+ia3
    ia3: list[dict] = field(default_factory=list)  # ia3.scale_stats() per IA3 module

    def by_type(self) -> list[dict]:
        """Per module type, the mean over layers of the scalar columns (None where no module has a value)."""
        kinds: dict[str, list[dict]] = {}
        for m in self.modules:
            kinds.setdefault(m.kind, []).append(m.to_dict())
        out = []
        for kind, rows in kinds.items():
            agg = {"kind": kind, "count": len(rows)}
            for key in ("delta_norm", "stable_rank", "rank_90", "rank_99", "weight_norm", "projection_norm",
                        "amplification", "random_baseline", "similarity_top1", "similarity_full"):
                if key in rows[0]:
                    vals = [r[key] for r in rows if r[key] is not None]
                    agg[key] = sum(vals) / len(vals) if vals else None
            out.append(agg)
        return out

    def to_dict(self) -> dict:
        return {"adapter": self.adapter, "r": self.r, "alpha": self.alpha, "base": self.base, "quant": self.quant,
                "compare": self.compare, "compare_r": self.compare_r,
                "modules": [m.to_dict() for m in self.modules], "by_type": self.by_type(),
                "only_in_adapter": self.only_in_adapter, "only_in_compare": self.only_in_compare,
                "method": self.method, "ia3": self.ia3}


def _layer(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _pair(adapter: peft_format.Adapter, module: str, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = adapter.pair(module)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ModelError(f"{where}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                         "expected (r, in) and (out, r).")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ModelError(f"{where}: {module} holds NaN or inf values; the adapter is broken (training diverged?).")
    return A, B


def _select(names: list[str], pattern: str | None, where: Path) -> list[str]:
    if pattern is None:
        return names
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--modules {pattern!r} is not a valid regular expression: {e}.") from None
    chosen = [n for n in names if rx.search(n)]
    if not chosen:
        raise ConfigError(f"--modules {pattern!r} matches none of the {len(names)} modules of {where}, "
                          f"e.g. {', '.join(names[:3])}.")
    return chosen


def _base_setup(src: Source, base: str | None, use_base: bool, quant: str, blocksize: int,
                double_quant: bool, device: torch.device | None = None
                ) -> tuple[str | None, BaseWeights | None, dict | None]:
    if quant not in ("auto", *QUANT_TYPES):
        raise ConfigError(f"--quant {quant!r}: choose auto, nf4, fp4, int8 or none.")
    if blocksize not in BLOCKSIZES:
        raise ConfigError(f"--blocksize {blocksize}: must be one of {list(BLOCKSIZES)}.")
    name = base if base is not None else (src.recipe.model.path if src.recipe is not None and use_base else None)
    if name is None:
        if quant != "auto":
            raise ConfigError(f"--quant {quant} describes the base, but no base is given; pass --base MODEL.")
        return None, None, None
    if quant == "auto" and src.recipe is not None:  # exactly as trained: the recipe's quant and frozen dtype
        qcfg, dtype, origin = src.recipe.quant, src.recipe.model.dtype, "recipe"
    else:  # a bare adapter: none = the weights as stored; nf4/fp4/int8 = as qlora-kit training would quantize
        qcfg = QuantConfig(type="none" if quant == "auto" else quant, blocksize=blocksize, double_quant=double_quant)
        dtype, origin = (None if qcfg.type == "none" else "auto"), "option"
    info = {"type": qcfg.type, "blocksize": qcfg.blocksize, "double_quant": qcfg.double_quant,
            "compute_dtype": qcfg.compute_dtype, "dtype": dtype, "source": origin}
    return name, BaseWeights(resolve(name), qcfg, dtype, device), info


def analyze(path: str | Path, *, base: str | None = None, use_base: bool = True, quant: str = "auto",
            blocksize: int = 64, double_quant: bool = True, compare: str | Path | None = None,
            modules: str | None = None, seed: int = 0, device: str = "auto") -> Report:
    """Analyse the adapter at `path` (an adapter folder, a run folder, or RUN/adapter).

    base: a model folder or built-in name; default for a run folder is its recipe's model (use_base=False skips
    it). quant `auto`: as the run's recipe trained, `none` for a bare adapter (its quantization is not recorded
    in adapter_config.json; pass nf4 to analyse against the 4-bit base QLoRA trains on). compare: another
    adapter (or run) with the same modules, e.g. a different rank or seed. modules: a regex (re.search) over full
    module names to limit the cost. seed: for the random baseline's directions. device: where the base is
    quantized (auto: CUDA when present, as training chose); the spectra and projections run in float64 on the CPU.
    """
    dev = resolve_device(device)  # a usage error before any file is read
    src = locate(path)
    stack = peft_format.load_stack(src.adapter_dir)
    adapter = next((a for a in stack if a.kind == "lora"), None)  # LoRA or DoRA: the spectra
    ia3_part = next((a for a in stack if a.kind == "ia3"), None)
    order = lambda n: (-1 if _layer(n) is None else _layer(n), n)  # noqa: E731  layer 2 before layer 10
    chosen = set(_select(sorted({m for a in stack for m in a.modules()}), modules, src.adapter_dir))
    names = sorted((n for n in adapter.modules() if n in chosen), key=order) if adapter else []
    base_name, weights, qinfo = _base_setup(src, base, use_base, quant, blocksize, double_quant, dev)
    report = Report(adapter=str(path), r=adapter.r if adapter else 0, alpha=adapter.alpha if adapter else 0.0,
                    base=base_name, quant=qinfo, method="+".join(a.method for a in stack))
    if ia3_part is not None:
        report.ia3 = [ia3.scale_stats(n, _layer(n), ia3_part.ia3_vector(n), ia3_part.feedforward(n))
                      for n in sorted((n for n in ia3_part.modules() if n in chosen), key=order)]
    other = None
    if compare is not None and adapter is None:
        raise ModelError(f"{path} is an IA3 adapter: --compare compares LoRA/DoRA subspaces (A matrices); "
                         "drop --compare.")
    if compare is not None:
        osrc = locate(compare)
        other = peft_format.load_adapter(osrc.adapter_dir)
        common = set(other.modules())
        report.compare, report.compare_r = str(compare), other.r
        report.only_in_adapter = [n for n in names if n not in common]
        report.only_in_compare = sorted(set(_select(other.modules(), modules, osrc.adapter_dir)) - set(names))
        names = [n for n in names if n in common]
        if not names:
            raise ModelError(f"{compare} adapts none of the modules of {path} (it has e.g. "
                             f"{', '.join(other.modules()[:3])}); compare adapters of the same model and targets.")
    for name in names:
        A, B = _pair(adapter, name, src.adapter_dir)  # (r, in), (out, r)
        scale = adapter.module_scaling(name)
        svd = delta_svd(A, B, scale)
        m = ModuleReport(module=name, layer=_layer(name), kind=name.rsplit(".", 1)[-1],
                         shape=(B.shape[0], A.shape[1]), r=A.shape[0], scaling=scale,
                         singular_values=svd.s.tolist(), stable_rank=stable_rank(svd.s),
                         rank_90=energy_rank(svd.s, 0.90), rank_99=energy_rank(svd.s, 0.99),
                         delta_norm=float(svd.s.square().sum().sqrt()))
        W = weights.weight(name, m.shape) if weights is not None else None
        if W is not None:
            m.base = amplification(W, svd, seed)
        if adapter.dora:
            start = torch.linalg.vector_norm(W.double(), dim=1) if W is not None else None
            m.magnitude = dora.magnitude_stats(adapter.magnitude(name), start)
        if other is not None:
            A2, _ = _pair(other, name, Path(str(compare)))
            m.similarity = subspace_similarity(A, A2).tolist()
        report.modules.append(m)
    return report
