"""Which device a command computes on, and the precision choices that depend on the device.

One rule for every command that computes (train, generate, eval, analyze, export): `auto` is the first CUDA GPU
when torch sees one, else the CPU; `cuda` without a visible GPU is a usage error (exit 2), never a silent CPU run.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str | torch.device = "auto", what: str = "--device") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` (or a torch.device) -> the torch.device to compute on."""
    if isinstance(choice, torch.device):
        choice = str(choice)
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {choice}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                              f"use {what} auto or cpu.")
        return torch.device(choice)
    raise ConfigError(f"{what} {choice!r}: choose one of {', '.join(DEVICE_CHOICES)}.")


def bf16_supported(device: torch.device | str) -> bool:
    """bf16 arithmetic runs natively: every CPU torch supports; CUDA from compute capability 8.0 (Ampere)."""
    device = torch.device(device)
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def allow_tf32(device: torch.device | str, compute_dtype: torch.dtype) -> bool:
    """fp32 compute on CUDA: let matmuls use TF32 tensor cores (10 mantissa bits in the products, fp32
    accumulation), ~10x the fp32 throughput of an Ampere+ GPU. Returns whether it was turned on."""
    if torch.device(device).type != "cuda" or compute_dtype != torch.float32:
        return False
    torch.set_float32_matmul_precision("high")
    return True
