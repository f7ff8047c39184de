"""One training example: token ids, labels and (packed rows only) position ids; what packing joins and batches hold."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss is taken; not shifted (HF convention: the loss shifts)
    position_ids: list[int] | None = None  # packed rows only: restarts at 0 for each document (packing.py)
