"""Analytic memory estimate of one QLoRA training step, from a model's config.json alone (no weights loaded).

Pure Python: no torch, no bitsandbytes. Each component below has a stable key so that a measured breakdown
(`qlora-kit bench memory`) can be put next to it line by line. All sizes are bytes. T = batch * seq tokens.

    quantized_weights   every decoder Linear (never lm_head): nf4/fp4 two codes per byte, int8 one byte, none bf16
    quant_constants     4-bit: absmax per block (fp32, or uint8 + nested fp32 per 256 blocks + 256-entry code with
                        double quantization) + 16-entry fp32 codebook; int8: one fp32 scale per output row
    unquantized_params  embeddings, norms, lm_head (once when tied), Linear biases; 2 bytes each
    adapters            LoRA A (r, in) and B (out, r) per adapted module, compute dtype; fp32 vectors: DoRA's
                        magnitude (out,) + its frozen ||W||^2 buffer (out,), IA3's (out,) or (in,) scales
    adapter_grads       the optimizer's ONE flat fp32 gradient (4 bytes per adapter parameter; each bf16 gradient
                        is summed into it and freed as soon as autograd makes it)
    optimizer_state     ONE flat fp32 master of the adapters + AdamW moments over it (fp32 or 8-bit blockwise;
                        paged: unified); on the CPU, torch's AdamW step adds two fp32 temporaries (sqrt, divide)
    activations         saved for backward (checkpointed: layer inputs + one layer recomputed) + backward workspace
    logits_and_loss     final norm/hidden + one chunk of fp32 logits and their gradients (chunked cross-entropy)
    cuda_context        a stated allowance for the CUDA context and cuBLAS workspace (0 on the CPU)

The total is the PEAK of one step, and `components` split it at that moment. A step has three phases whose
transient tensors are never live together (measured with the allocator's events, `qlora-kit bench memory`):
    loss head           layer inputs (or all saved activations) + final norm + one chunk's logits and gradients;
                        adapter gradients do not exist yet (they are set to None after every step)
    decoder backward    layer inputs + one layer recomputed + in-flight gradients + one dequantized weight
                        + the flat fp32 gradient (allocated by the first adapter gradient)
    optimizer step      the flat fp32 gradient + the update's temporaries (counted in optimizer_state)
    reference pass      preference objectives (objective.py): the no-grad passes before the policy's forward
The largest is the peak (`peak_phase`, all in `phases`); `sizes` has each component's own maximum over the step.
grad_accum > 1 also keeps adapter gradients through the loss head (not modelled).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qlora_kit.errors import ConfigError, ModelError
from qlora_kit.estimate.activations import (  # noqa: F401 (layer_activations, mlp_saved: re-exported for tests)
    activation_terms, label_tokens, layer_activations, logits_terms, mlp_saved, tiled)
from qlora_kit.estimate.backward import backward_terms
from qlora_kit.estimate.settings import EstimateConfig  # noqa: F401 (the estimate's input, re-exported)
from qlora_kit.estimate.count import KNOWN_TYPES, count_params  # noqa: F401 (re-exported)
from qlora_kit.estimate.shapes import LinearShape, ModelShapes  # noqa: F401 (callers read shapes through here)
from qlora_kit.estimate.builtins import BUILTIN_CONFIGS
from qlora_kit.estimate.objective import no_grad_terms, step_config
from qlora_kit.terms import NESTED_BLOCKSIZE, GiB

CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context + cuBLAS/cuDNN workspaces: invisible to torch's allocator stats
OPTIM_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers: one fp32 absmax per 256 state values
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps tensors smaller than this in 32-bit optimizer state
GPU_SIZES_GIB = (8, 12, 16, 24, 40, 48, 80)
COMPONENTS = ("quantized_weights", "quant_constants", "unquantized_params", "adapters", "adapter_grads",
              "optimizer_state", "activations", "logits_and_loss", "cuda_context")

@dataclass(frozen=True)
class Estimate:
    components: dict[str, int]  # keys: COMPONENTS, in that order
    shapes: ModelShapes
    adapted: tuple[str, ...]  # adapted module names of one decoder layer
    adapter_params: int
    bits_per_weight: float  # (quantized_weights + quant_constants) * 8 / linear params
    activation_terms: dict[str, int]  # the parts of `activations`
    logits_terms: dict[str, int]  # the parts of `logits_and_loss`
    unchunked_loss: int  # what a plain (B, S, V) fp32 cross-entropy would hold instead of logits_and_loss
    pageable: int  # bytes in CUDA unified memory (paged optimizers): may spill to CPU RAM under pressure
    peak_phase: str  # "loss_head" | "decoder_backward" | "optimizer_step": where the peak (`total`) happens
    phases: dict[str, int]  # each phase's total (static components + that phase's transient tensors)
    sizes: dict[str, int]  # each component's own maximum over the step, whichever phase it peaks in
    host: dict[str, int] = field(default_factory=dict)  # host (CPU RAM) bytes outside `total`: offloaded_activations
    by_phase: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> components at that phase's peak
    objective_terms: dict[str, int] = field(default_factory=dict)  # preference: the no-grad passes' (objective.py)
    total: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "total", sum(self.components.values()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = {k: v for k, v in d["shapes"].items() if k not in ("linears", "other")}
        d["params"] = {"base_total": self.shapes.total, "quantized_linear": self.shapes.linear_params,
                       "unquantized": sum(self.shapes.other.values()), "adapters": self.adapter_params,
                       "unquantized_by_name": self.shapes.other}
        return d


def resolve_targets(shapes: ModelShapes, targets) -> tuple[str, ...]:
    names = list(dict.fromkeys(lin.name for lin in shapes.linears))  # GPT-2's c_proj: in attention and the MLP
    if targets == "all-linear":
        return tuple(names)
    for t in targets:
        if t not in names:
            near = difflib.get_close_matches(t, names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"target {t!r} is not a Linear of a decoder layer{hint}; choose from all-linear or "
                              f"{', '.join(names)}")
    return tuple(n for n in names if n in targets)


def _quant_bytes(lin: LinearShape, cfg: EstimateConfig) -> tuple[int, int]:
    """(weight bytes, constant bytes) of one quantized Linear, as bitsandbytes stores them."""
    n = lin.numel
    if cfg.quant == "none":
        return 2 * n, 0  # bf16
    if cfg.quant == "int8":
        return n, 4 * lin.out_features  # int8 codes + fp32 absmax per output row
    blocks = math.ceil(n / cfg.blocksize)
    if cfg.double_quant:  # uint8 absmax + fp32 absmax per 256 blocks + 256-entry fp32 code + fp32 offset
        consts = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * 256 + 4
    else:
        consts = 4 * blocks
    return (n + 1) // 2, consts + 4 * 16  # two 4-bit codes per byte; + the 16-entry fp32 codebook


def _optimizer_bytes(numel: int, optimizer: str) -> int:
    """AdamW state (exp_avg, exp_avg_sq) of one adapter tensor."""
    if optimizer in ("adamw", "paged_adamw") or numel < MIN_8BIT_SIZE:
        return 2 * 4 * numel  # fp32
    return 2 * numel + 2 * 4 * math.ceil(numel / OPTIM_BLOCKSIZE)  # uint8 + one fp32 absmax per 256, per state


def estimate(config: dict, cfg: EstimateConfig) -> Estimate:
    s = count_params(config)
    adapted = resolve_targets(s, cfg.targets)
    resolve_targets(s, cfg.ia3_outputs), resolve_targets(s, cfg.ia3_inputs)  # names checked: clear errors
    wq = cq = 0
    for lin in s.linears:  # each expert of a fused expert tensor is quantized like one Linear
        w, k = _quant_bytes(lin, cfg)
        wq, cq = wq + lin.count * w, cq + lin.count * k
    # LoRA A (r, in) and B (out, r) per adapted Linear, and per expert per projection
    n_lora = sum(lin.count * cfg.rank * (lin.in_features + lin.out_features) for lin in s.linears
                 if lin.name in adapted)
    # fp32 vectors: DoRA's magnitude (out,) per LoRA target; IA3's (out,) or (in,) per scaled module
    n_vectors = sum(lin.count * ((lin.out_features if lin.name in adapted and cfg.dora else 0)
                                 + (lin.out_features if lin.name in cfg.ia3_outputs else 0)
                                 + (lin.in_features if lin.name in cfg.ia3_inputs else 0)) for lin in s.linears)
    n_adapter = n_lora + n_vectors
    # DoRA's frozen ||W_i||^2 buffer, (out,) fp32 per target (dora.DoRALinear.w2): not trained, but resident
    dora_w2 = 4 * sum(lin.count * lin.out_features for lin in s.linears if lin.name in adapted) if cfg.dora else 0
    # optim.MasterWeightOptimizer: the inner optimizer steps ONE flat fp32 master of every adapter
    inner = _optimizer_bytes(n_adapter, cfg.optimizer)
    optim = inner + 4 * n_adapter
    objective, cfg = cfg, step_config(cfg)  # a preference step's rows with gradients (2 per pair) from here on
    acts, logits = activation_terms(s, cfg, adapted), logits_terms(s, cfg)
    acts.update(backward_terms(s, cfg, adapted, acts))  # the layout's own backward moments (backward.py)
    static = {
        "quantized_weights": wq, "quant_constants": cq,
        "unquantized_params": 2 * sum(s.other.values()),  # bf16/fp16
        "adapters": cfg.compute_bytes * n_lora + 4 * n_vectors + dora_w2, "optimizer_state": optim,
        "cuda_context": CUDA_CONTEXT_BYTES if cfg.device == "cuda" else 0,
    }
    grads = 4 * n_adapter  # the flat fp32 gradient; a bf16 adapter gradient lives only until its hook sums it
    kept = acts["all_layers"] if "all_layers" in acts else acts["layer_inputs"]  # live in every phase
    offloaded = cfg.offload_activations and cfg.checkpointing
    one_input = cfg.compute_bytes * cfg.batch * cfg.seq * s.hidden
    host = {"offloaded_activations": s.layers * one_input} if offloaded else {}
    # torch's single-tensor AdamW on the CPU: sqrt(exp_avg_sq) and its quotient, (n,) fp32 each; fused on CUDA: none
    step_temps = 8 * n_adapter if cfg.optimizer == "adamw" and cfg.device == "cpu" else 0
    # Backward runs from the last layer down: the worst moment is the first layer done (everything kept, and the
    # flat gradient, allocated whole by the first adapter gradient); that layer adds its recomputed activations and
    # the backward workspace. Offloaded, "kept" is 2 layer inputs (the top layer's + the prefetched one), and none
    # is on the device at the loss head (all on the host).
    # live like the layer inputs (every phase but the optimizer step), never offloaded: the tiled MLPs' RNG states
    # and the attention masks the model builds once and hands every checkpointed layer
    rng = acts.get("rng_states", 0) + acts.get("attention_masks", 0)
    working = sum(acts.values()) - kept - rng
    head_kept = (0 if offloaded else kept) + rng
    transient = {  # phase -> the step-dependent components live at that phase's peak
        "loss_head": {"adapter_grads": 0, "activations": head_kept, "logits_and_loss": sum(logits.values())},
        "decoder_backward": {"adapter_grads": grads, "activations": kept + rng + working, "logits_and_loss": 0},
        "optimizer_step": {"adapter_grads": grads, "activations": 0, "logits_and_loss": 0,
                           "optimizer_state": step_temps},
    }
    no_grad = no_grad_terms(s, objective, acts["dequantized_weight"] + acts.get("dequant_workspace", 0))
    if no_grad:  # before the policy's forward, nothing kept: its decoder's or its head's peak, not both at once
        transient["reference_pass"] = {"adapter_grads": 0, "activations": max(no_grad.values()),
                                       "logits_and_loss": 0}
    by_phase = {name: {k: static.get(k, 0) + t.get(k, 0) for k in COMPONENTS} for name, t in transient.items()}
    phases = {name: sum(c.values()) for name, c in by_phase.items()}
    peak = max(phases, key=phases.get)
    components = by_phase[peak]
    own = {"adapter_grads": grads, "activations": sum(acts.values()), "logits_and_loss": sum(logits.values()),
           "optimizer_state": step_temps}  # each at its own worst moment (the first layer done, for activations)
    sizes = {k: static.get(k, 0) + own.get(k, 0) for k in COMPONENTS}
    # the peer: transformers' final RMSNorm (fp32 input + rsqrt) and normed output, and (B, S, V) fp32 logits x3
    unchunked = 4 * cfg.batch * cfg.seq * (s.hidden + 1) + cfg.compute_bytes * cfg.batch * cfg.seq * s.hidden + \
        3 * 4 * cfg.batch * cfg.seq * s.vocab
    return Estimate(components, s, adapted, n_adapter, (wq + cq) * 8 / s.linear_params, acts, logits,
                    unchunked, inner if cfg.optimizer.startswith("paged") else 0, peak, phases, sizes, host,
                    by_phase, no_grad)


def max_seq_table(config: dict, cfg: EstimateConfig, gpus_gib=GPU_SIZES_GIB) -> list[dict]:
    """Longest sequence (at cfg.batch) whose estimate fits each GPU size, by bisection on seq. `max_seq` is None
    when even one token does not fit; `capped` is True when max_position_embeddings fits."""
    cap = count_params(config).max_positions
    rows = []
    for gib in gpus_gib:
        def fits(seq: int, gib: float = gib) -> bool:
            return estimate(config, replace(cfg, seq=seq)).total <= gib * GiB
        if not fits(1):
            best, capped = None, False
        elif fits(cap):
            best, capped = cap, True
        else:
            lo, hi = 1, cap  # fits(lo), not fits(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            best, capped = lo, False
        rows.append({"gpu_gib": gib, "gpu_bytes": gib * GiB, "max_seq": best, "capped": capped})
    return rows


# ---- model resolution ------------------------------------------------------------------------------------------


def load_model_config(model: str) -> dict:
    """config.json of a model folder, or a built-in config by name."""
    if model in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[model])
    path = Path(model).expanduser()
    if not path.exists():
        near = difflib.get_close_matches(model, list(BUILTIN_CONFIGS), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ModelError(f"{model}: no such folder and not a built-in name; {hint}built-in: "
                         f"{', '.join(BUILTIN_CONFIGS)}")
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        found = sorted(p.name for p in path.iterdir())[:6]
        raise ModelError(f"{path} has no config.json (found: {', '.join(found) or 'nothing'}); point --model at "
                         "a Hugging Face model folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object")
    return config
