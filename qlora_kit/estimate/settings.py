"""EstimateConfig: the settings that decide a training step's memory, flat, with the recipe's defaults."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from ..config import DataConfig, LoraConfig, Objective, Optimizer, QuantConfig, TrainConfig
from ..ranges import LIMITS
from ..errors import ConfigError
from ..terms import BLOCKSIZES, QUANT_TYPES, QuantType


# Upper bounds of the sizes (the recipe's own, config.py): past them no machine holds one step
MAX_SIZES = {"rank": 1 << 16, "batch": LIMITS["train", "batch_size"], "seq": LIMITS["data", "max_length"],
             "loss_chunk": LIMITS["train", "loss_chunk"]}


@dataclass(frozen=True)
class EstimateConfig:
    """The settings that decide memory, flat; defaults are the recipe's own (config.py)."""

    quant: QuantType = QuantConfig.type
    blocksize: int = QuantConfig.blocksize
    """Weights per absmax constant (nf4/fp4)."""
    double_quant: bool = QuantConfig.double_quant
    rank: int = LoraConfig.r
    targets: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    """`all-linear` or module names of a decoder layer (q_proj, v_proj, ...)."""
    optimizer: Optimizer = TrainConfig.optimizer
    batch: int = TrainConfig.batch_size
    seq: int = DataConfig.max_length
    checkpointing: bool = TrainConfig.gradient_checkpointing  # non-reentrant checkpointing of every decoder layer
    device: Literal["cuda", "cpu"] = "cuda"
    loss_chunk: int = TrainConfig.loss_chunk  # label tokens per cross-entropy chunk; the trainer's default
    compute_bytes: int = 2
    """Bytes of the compute dtype: activations and adapters (2: bf16, 4: fp32)."""
    lora_dropout: float = LoraConfig.dropout
    """> 0 with replay_dropout=False: each adapter keeps its own dropped copy of its input and a mask (nn.Dropout)."""
    replay_dropout: bool = True
    """LoRA dropout masks regenerated in backward from the RNG state (dropout_replay.py): nothing saved but x."""
    offload_activations: bool = TrainConfig.offload_activations
    """Checkpointed layer inputs in host memory (offload.py): 2 on the device in backward, all L on the host."""
    mlp_chunk: int = TrainConfig.mlp_chunk
    """> 0: tiled MLP (tiled_mlp.py): one chunk's intermediates at a time."""
    reembed: bool = True
    """Checkpointing without offload: layer 0 keeps the token ids, not its input (reembed.py; not under fsdp)."""
    dora: bool = LoraConfig.dora
    """lora.dora: each LoRA target also trains an (out,) fp32 magnitude and keeps an (out,) fp32 ||W||^2 buffer."""
    ia3_outputs: tuple[str, ...] = ()
    """ia3.outputs: modules whose output an (out,) fp32 vector scales (empty: no IA3)."""
    ia3_inputs: tuple[str, ...] = ()
    """ia3.inputs: modules whose input an (in,) fp32 vector scales."""
    objective: Objective = TrainConfig.objective
    """train.objective: a preference objective runs 2 rows per pair and no-grad passes (estimate/objective.py)."""
    precompute_reference: bool = TrainConfig.precompute_reference
    """train.precompute_reference (dpo, ipo): the reference log-probs computed before training, no reference pass."""

    def __post_init__(self):
        if not isinstance(self.mlp_chunk, int) or self.mlp_chunk < 0:
            raise ConfigError(f"mlp_chunk must be an integer >= 0 (0: off), got {self.mlp_chunk!r}")
        for name in ("rank", "batch", "seq", "loss_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
            if getattr(self, name) > MAX_SIZES[name]:
                raise ConfigError(f"{name} {getattr(self, name)} is beyond any machine (at most {MAX_SIZES[name]}); "
                                  "without --seq, the table at the end shows the longest sequence each GPU size fits.")
        choices = {"quant": QUANT_TYPES, "optimizer": typing.get_args(Optimizer), "device": ("cuda", "cpu"),
                   "blocksize": BLOCKSIZES, "compute_bytes": (2, 4), "objective": typing.get_args(Objective)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
        both = sorted(set(self.ia3_outputs) & set(self.ia3_inputs))
        if both:
            raise ConfigError(f"ia3: {both[0]} is in both outputs and inputs; a module scales its output or its "
                              "input, not both. Remove it from one list")
        if self.precompute_reference and self.objective not in ("dpo", "ipo"):
            raise ConfigError(f"precompute_reference works with objective dpo or ipo, not {self.objective}: orpo and "
                              "simpo have no reference, kto pairs each prompt with another answer in the step")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.lora_dropout}")
