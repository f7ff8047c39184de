"""What a recipe trains on, before any model loads: the first examples as the model sees them with the tokens that
take loss marked, the counts (records, truncated, dropped), the token lengths, and how full the rows are.

Everything comes from pipeline.build, the same call training makes (same cache, split, packing plan): the preview
cannot show other data than the run trains on.
"""

from __future__ import annotations

import random
from typing import Any

from . import pipeline
from ..config import DataConfig
from ..terms import IGNORE
from .packing import plan

BINS = 8  # histogram bars over 0..max_length


def segments(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The example as (text, takes loss) runs. Token t takes loss when labels[t] is not IGNORE and t > 0 (the loss
    predicts token t from tokens < t: the first token is never a target). Runs are decoded whole, so a character
    split over several byte-level tokens comes out in one piece."""
    flags = [t > 0 and label != IGNORE for t, label in enumerate(labels)]
    runs: list[tuple[list[int], bool]] = []
    for tok, flag in zip(input_ids, flags):
        if runs and runs[-1][1] == flag:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], flag))
    return [(tokenizer.decode(ids, skip_special_tokens=False), flag) for ids, flag in runs]


def histogram(lengths: list[int], max_length: int, bins: int = BINS) -> list[tuple[int, int, int]]:
    """(low, high, count) over (low, high], `bins` equal bars from 0 to max_length (lengths are truncated to it)."""
    width = max(1, -(-max_length // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, max(0, (n - 1) // width))] += 1
    return [(i * width, min(max_length, (i + 1) * width), c) for i, c in enumerate(counts)]


def _fill(tokens: int, rows: int, max_length: int) -> float:
    """Share of the rows' max_length slots holding a real token (the rest is padding)."""
    return tokens / (rows * max_length) if rows else 0.0


def preview(cfg: DataConfig, tokenizer: Any, seed: int, show: int = 3) -> dict:
    """A JSON-able report of what training on `cfg` with `tokenizer` (split seeded by `seed`) reads."""
    ds = pipeline.build(cfg, tokenizer, seed)
    every = pipeline.Examples(ds.train.tok, list(range(len(ds.train.tok))))  # file order, unpacked, no split
    lengths = every.lengths()
    train_lengths = [lengths[i] for i in sorted(set(ds.train.index.tolist()))]  # build's order: its packing plan
    if cfg.packing:
        packing = {"on": True, "rows": len(ds.train), "documents": len(train_lengths),
                   "fill": _fill(sum(train_lengths), len(ds.train), cfg.max_length)}
    else:  # what data.packing=true would make of the same training examples (the plan training would use)
        rows = plan(train_lengths, cfg.max_length, random.Random(seed + 1))
        packing = {"on": False, "rows": len(ds.train), "fill": _fill(sum(train_lengths), len(ds.train),
                                                                       cfg.max_length),
                   "if_packed_rows": len(rows), "if_packed_fill": _fill(sum(train_lengths), len(rows), cfg.max_length)}
    shown = []
    for i in range(min(show, len(every))):
        ex = every[i]
        shown.append({"record": int(every.tok.records[i]) + 1, "tokens": len(ex.input_ids),
                      "loss_tokens": sum(1 for t, x in enumerate(ex.labels) if t > 0 and x != IGNORE),
                      "segments": segments(tokenizer, ex.input_ids, ex.labels)})
    s = ds.stats
    ordered = sorted(lengths)
    return {"path": str(cfg.path), "format": cfg.format, "max_length": cfg.max_length,
            "records": s["records"], "examples": len(every), "truncated": s["truncated"], "dropped": s["dropped"],
            "boundary_merges": s["boundary_merges"], "train_rows": len(ds.train), "val_examples": len(ds.val),
            "tokens": sum(lengths), "loss_tokens": every.label_tokens(),
            "lengths": {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]} if ordered
            else {}, "histogram": histogram(lengths, cfg.max_length), "packing": packing, "shown": shown}
