"""The words of `qlora-kit estimate`'s tables, shared by the one-device and the per-device (--gpus) reports."""

from __future__ import annotations

LABELS = {
    "quantized_weights": "quantized linear weights",
    "quant_constants": "quantization constants",
    "unquantized_params": "unquantized params (embeddings, norms, lm_head)",
    "adapters": "LoRA adapters",
    "adapter_grads": "adapter gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "logits_and_loss": "logits and loss",
    "cuda_context": "CUDA context + workspace (allowance)",
}

PHASES = {"loss_head": "loss head (logits chunk)", "decoder_backward": "decoder backward",
          "optimizer_step": "optimizer step", "reference_pass": "reference pass (no grad)"}


def seq_cell(row: dict) -> str:
    if row["max_seq"] is None:
        return "does not fit"
    return f">= {row['max_seq']:,} (max)" if row["capped"] else f"{row['max_seq']:,}"
