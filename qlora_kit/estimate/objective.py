"""What a preference objective (train.objective, train.precompute_reference) changes in one step's memory.

Pure Python (part of the estimate). Sizes in bytes; c = the compute dtype's bytes.

  rows with gradients   dpo, ipo, orpo, simpo: chosen and rejected are one concatenated batch of 2 x batch rows,
                        so every activation and loss-head term is that of a 2 x batch step; kto: its batch answers
                        (its mismatched pairs run without gradients)
  no-grad passes        before the policy's forward, with nothing of them kept: the reference (the same model, every
                        adapter off; dpo, ipo, kto; none with train.precompute_reference, nor for orpo and simpo)
                        over the rows with gradients, and kto's mismatched pairs (policy and reference, batch rows).
                        Their transient peak is the phase `reference_pass`: the residual stream and one MLP's
                        working set, or the label rows and one chunk of the head, whichever is larger.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from qlora_kit.estimate.activations import label_tokens

if TYPE_CHECKING:
    from qlora_kit.estimate.settings import EstimateConfig
    from qlora_kit.estimate.shapes import ModelShapes

PAIRED = ("dpo", "ipo", "orpo", "simpo")  # a pair's two answers run as two rows
WITH_REFERENCE = ("dpo", "ipo", "kto")  # config.REFERENCE_OBJECTIVES


def step_config(cfg: EstimateConfig) -> EstimateConfig:
    """cfg with `batch` = the rows that run with gradients (the batch every activation term is counted for)."""
    return dataclasses.replace(cfg, batch=2 * cfg.batch) if cfg.objective in PAIRED else cfg


def no_grad_rows(cfg: EstimateConfig) -> int:
    """Rows of the largest no-grad pass of a step (0: none)."""
    reference = cfg.objective in WITH_REFERENCE and not cfg.precompute_reference
    if cfg.objective == "kto":  # the answers' reference, the mismatched pairs' policy and reference: batch rows each
        return cfg.batch
    return step_config(cfg).batch if reference else 0


def no_grad_terms(s: ModelShapes, cfg: EstimateConfig, deq: int) -> dict[str, int]:
    """The transient peak of one no-grad pass of no_grad_rows(cfg) rows (empty: no such pass). `deq`: one
    Linear's transient dequantization (and its CPU workspace), as in a step with gradients.

    decoder: the residual stream (T, H) c and a layer's output (T, H) c, the MLP's normed input (T, H) c and at
    its worst three (T, I) c (the activation's output, the up projection's and its LoRA output, before the
    product frees them), plus one dequantized weight. head: the label rows (N, H) c, and one chunk's normed rows
    (C, H) c, its fp32 logits and their log-softmax (C, V) fp32 each (the c logits are freed by the cast to fp32:
    nothing holds them without autograd)."""
    rows = no_grad_rows(cfg)
    if not rows:
        return {}
    c = cfg.compute_bytes
    ng = dataclasses.replace(cfg, batch=rows)
    T, N = rows * cfg.seq, label_tokens(ng)
    chunk = min(cfg.loss_chunk, N)
    decoder = c * T * (3 * s.hidden + 3 * s.active_intermediate) + deq
    head = c * N * s.hidden + c * chunk * s.hidden + 8 * chunk * s.vocab
    return {"reference_decoder": decoder, "reference_head": head}
