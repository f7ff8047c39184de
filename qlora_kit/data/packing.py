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

import bisect
import random
from typing import Sequence

from ..terms import IGNORE
from .example import Example


def plan(lengths: Sequence[int], max_length: int, rng: random.Random) -> list[list[int]]:
    """Best-fit packing in a seeded order: each example goes into the open row whose free space fits it most
    tightly, or opens a new row. -> rows, each a list of indices into `lengths` (an example is never split).

    Best fit leaves far less padding than filling rows one after another when long and short examples mix (the
    short ones fill the gaps the long ones leave). Rows are kept in buckets by free space, found by bisection, so
    a million examples pack in seconds."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free tokens -> rows (indices into `rows`) with exactly that much room
    sizes: list[int] = []  # the keys of by_free with rows in them, sorted (bisect finds the tightest fit)
    for i in order:
        n = min(lengths[i], max_length)
        k = bisect.bisect_left(sizes, n)
        if k == len(sizes):
            rows.append([])
            r, free = len(rows) - 1, max_length
        else:
            free = sizes[k]
            r = by_free[free].pop()
            if not by_free[free]:
                sizes.pop(k)
        rows[r].append(i)
        left = free - n
        if not by_free.get(left):
            by_free[left] = []
            bisect.insort(sizes, left)
        by_free[left].append(r)
    return rows


def join(examples: Sequence[Example]) -> Example:
    """One packed row: the examples concatenated, position ids restarting at 0 and each first label IGNORE."""
    ids, labels, positions = [], [], []
    for ex in examples:
        ids += ex.input_ids
        labels += [IGNORE] + list(ex.labels[1:])
        positions += range(len(ex.input_ids))
    return Example(ids, labels, positions)


def pack(examples: Sequence["Example"], max_length: int, rng: random.Random) -> list["Example"]:
    """plan + join over in-memory Examples (data.Examples packs its compact storage the same way)."""
    return [join([examples[i] for i in row]) for row in plan([len(e.input_ids) for e in examples], max_length, rng)]


def document_ids(position_ids: Sequence[int]) -> list[int]:
    """[0, 0, 0, 1, 1, 2, ...]: which document of the row each token belongs to (a new one at every restart to 0)."""
    doc, out = -1, []
    for p in position_ids:
        doc += p == 0
        out.append(doc)
    return out
