"""LoftQ initialisation (Li et al. 2023, arXiv 2310.08659, Algorithm 1): start the adapter where it cancels the
quantization error, instead of at B = 0.

Plain QLoRA starts from dequant(quant(W)) + s·B·A with B = 0: the model at step 0 is the quantized model, off from W
by the whole quantization error. LoftQ alternates T times:

    Q_t          = quant(W - s·B_{t-1}·A_{t-1})                (B_0 A_0 = 0)
    s·B_t·A_t    = best rank-r approximation of W - dequant(Q_t) (truncated SVD)

so that dequant(Q_T) + s·B_T·A_T ≈ W at step 0. The frozen base is then NOT quant(W) but quant(W - O) with the
low-rank offset O = s·B_{T-1}·A_{T-1}. Everything that rebuilds the base (loading a run for generate/eval, resuming,
export's dequantized merge) must quantize the same W - O: the run stores O as two factors in RUN/loftq.safetensors
(`<module>.offset_B` (out, r) = s·B_{T-1}, `<module>.offset_A` (r, in) = A_{T-1}, fp32), and `base_weight` is the
one function that applies it. T = 1 gives O = 0: the base is quant(W), only the adapter starts differently.

Split of the singular values between the factors as in PEFT's LoftQ: B = U·sqrt(S)/sqrt(s), A = sqrt(S)·Vh/sqrt(s).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..quant.bnb import QuantSpec, roundtrip

FILE = "loftq.safetensors"
DEFAULT_ITERS = 5  # the LoftQ paper's experiments alternate 5 times (T = 5); PEFT's default is 1


def base_weight(W: torch.Tensor, offset: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The weight a LoftQ base quantizes: W - offset_B @ offset_A, in fp32 on W's device (W as is without one)."""
    if offset is None:
        return W
    B, A = offset
    return W.float() - B.to(W.device, torch.float32) @ A.to(W.device, torch.float32)


def init(W: torch.Tensor, spec: QuantSpec, r: int, scaling: float, iters: int = DEFAULT_ITERS):
    """-> (offset (s·B_{T-1} (out, r), A_{T-1} (r, in)), A (r, in), B (out, r)), all fp32 on W's device.

    dequant(quant(base_weight(W, offset))) + scaling · B @ A approximates W (fp32 arithmetic throughout)."""
    W = W.float()
    out_f, in_f = W.shape
    A = torch.zeros(r, in_f, device=W.device)
    B = torch.zeros(out_f, r, device=W.device)
    offset = (B, A)
    for _ in range(max(1, iters)):
        offset = (B * scaling, A)
        residual = W - roundtrip(base_weight(W, offset), spec, torch.float32)  # (out, in) = W - dequant(Q_t)
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        root = S[:r].sqrt()  # (r,)
        B = U[:, :r] * root / scaling**0.5  # (out, r)
        A = root[:, None] * Vh[:r] / scaling**0.5  # (r, in)
    return offset, A, B


def save(folder: Path, offsets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    from safetensors.torch import save_file

    from ..atomic import atomic_file

    tensors = {}
    for m, (B, A) in offsets.items():
        tensors[f"{m}.offset_B"], tensors[f"{m}.offset_A"] = (B.detach().float().cpu().contiguous(),
                                                               A.detach().float().cpu().contiguous())
    path = Path(folder) / FILE
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "what": "LoftQ base offsets: base = quant(W - B @ A)"})
    return path


def load(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The offsets a LoftQ run's base was quantized with; a clear error when the file is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import ModelError

    path = Path(folder) / FILE
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} cannot be read ({e}): this run was trained with lora.init loftq, whose frozen base "
                         "is quantized around offsets stored there; without them the base cannot be rebuilt. Restore "
                         "the file from a copy of the run, or retrain.") from None
    mods = {k.rsplit(".offset_", 1)[0] for k in raw}
    return {m: (raw[f"{m}.offset_B"], raw[f"{m}.offset_A"]) for m in mods}


def is_loftq_run(recipe) -> bool:
    return recipe is not None and recipe.lora.init == "loftq"


class Initializer:
    """`model.load_base(..., before_quantize=init)`: each targeted weight is quantized as W - offset, the offset
    computed here by `init` (a new run: A and B kept for `apply`) or taken from a run's stored offsets."""

    def __init__(self, targets, spec: QuantSpec, r: int, scaling: float, iters: int = DEFAULT_ITERS,
                 stored: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.targets, self.spec, self.r, self.scaling, self.iters = targets, spec, r, scaling, iters
        self.stored = stored
        self.offsets: dict[str, tuple[torch.Tensor, torch.Tensor]] = dict(stored or {})
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A, B) fp32
        self.seconds = 0.0  # time spent in SVD + quantization round trips: LoftQ's extra load cost

    @classmethod
    def from_run(cls, run_dir: Path) -> "Initializer":
        stored = load(run_dir)
        return cls(sorted(stored), QuantSpec(), 1, 1.0, 1, stored)  # targets: exactly the stored modules

    def __call__(self, module: str, W: torch.Tensor) -> torch.Tensor:
        from ..errors import ModelError
        from .lora import match_targets

        if self.stored is not None:
            if module not in self.stored:
                return W  # not adapted: quantized plainly, as when the run trained
            return base_weight(W, self.stored[module])
        if not match_targets([module], self.targets):
            return W
        import time

        t0 = time.perf_counter()
        if min(W.shape) < self.r:
            raise ModelError(f"lora.r={self.r} exceeds min(in, out)={min(W.shape)} of {module}: LoftQ's rank-r "
                             "SVD needs r <= min(in, out). Lower lora.r, or leave that layer out of lora.targets "
                             f"(e.g. a regex or list without {module.rsplit('.', 1)[-1]}).")
        offset, A, B = init(W, self.spec, self.r, self.scaling, self.iters)
        self.offsets[module], self.adapters[module] = offset, (A, B)
        self.seconds += time.perf_counter() - t0
        return base_weight(W, offset)

    def apply(self, model: torch.nn.Module) -> None:
        """Copy the LoftQ A and B into the model's LoRALinear modules (after lora.inject)."""
        with torch.no_grad():
            for module, (A, B) in self.adapters.items():
                m = model.get_submodule(module)
                m.lora_A.weight.copy_(A)
                m.lora_B.weight.copy_(B)
