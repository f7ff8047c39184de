"""Packing: several short examples in one row, each still seeing only itself.

A packed row is the concatenation of whole examples (<= max_length tokens) with `position_ids` that restart at 0 at
each example's first token. The model runs a packed batch with attention_mask=None and those position ids;
transformers (>= 4.56, `masking_utils.find_packed_sequence_indices`) then reads each restart as a document boundary
and builds a block-diagonal causal mask for eager/SDPA/flex attention, while flash-attention-2 turns the same
position ids into variable-length (cu_seqlens) calls. Each document therefore gets exactly the rotary positions and
the attention it gets alone, so a packed batch computes the same per-token losses as the examples unpacked
(tests/test_packing.py checks this in fp32, and that no gradient flows across a boundary).

Each packed example's first label becomes IGNORE: the last token of one document never "predicts" the first token of
the next, so exactly the tokens that take loss unpacked take loss packed.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .data import Example

IGNORE = -100


def pack(examples: Sequence["Example"], max_length: int, rng: random.Random) -> list["Example"]:
    """Greedily fill rows of <= max_length tokens with whole examples in a seeded order (first fit in that order).

    -> rows whose position_ids restart at 0 for each example (an example is never split across rows)."""
    from .data import Example

    order = list(range(len(examples)))
    rng.shuffle(order)
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for i in order:
        ex = examples[i]
        if ids and len(ids) + len(ex.input_ids) > max_length:
            rows.append(Example(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids.extend(ex.input_ids)
        labels.extend([IGNORE] + list(ex.labels[1:]))
        positions.extend(range(len(ex.input_ids)))
    if ids:
        rows.append(Example(ids, labels, positions))
    return rows


def document_ids(position_ids: Sequence[int]) -> list[int]:
    """[0, 0, 0, 1, 1, 2, ...]: which document of the row each token belongs to (a new one at every restart to 0)."""
    doc, out = -1, []
    for p in position_ids:
        doc += p == 0
        out.append(doc)
    return out
