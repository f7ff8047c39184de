"""Blockwise 4-bit (NF4/FP4) codes on the CPU, bit for bit what bitsandbytes computes, several times faster.

bitsandbytes (0.50) quantizes 4-bit on the CPU in plain torch over the whole flattened weight at once: one fp32
copy, |x|, a per-block max, x · (1/absmax), a clamp, `torch.bucketize` against the 15 midpoints of the codebook
(a binary search per element, one thread), then nibble packing, each pass a new (numel,) temporary that does not
fit in cache. That is 65% of an exact (dequantized-base) merge on the CPU, and what loading a model for training
pays too (bench/results/merge.md). Here the same arithmetic runs over chunks of whole blocks (~256 KB of fp32, so
the passes stay in cache), on a pool of threads (torch ops release the GIL), written straight into preallocated
outputs. Exactly the same float operations in the same order, so the codes and constants are identical:

    absmax_b = max |x| over block b (fp32; the last, partial block too)
    scaled   = clamp(x * (1 / max(absmax_b, 1e-38)), -1, 1)   full blocks: multiply by the fp32 reciprocal
             = clamp(x / max(absmax_b, 1e-38), -1, 1)          the partial last block: a division
    code     = #{midpoints m : m < scaled} (= torch.bucketize), mapped through argsort(codebook) (FP4's is unsorted)
    packed   = (code[2i] << 4) | code[2i + 1]   (an odd count is padded with the code of 0.0)

No bitsandbytes import: the caller (quant.py, the only importer) passes the codebook; tests compare the results
with bitsandbytes' own on many shapes, aligned and not.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

CHUNK = 1 << 16  # elements per task (256 KB of fp32): each pass over a chunk stays in L2


def _bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(15,) fp32 midpoints between sorted code values, and the sorted -> code index map (bitsandbytes' rule)."""
    code = code.float().cpu()
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order.to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _tables(bounds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """Lookup tables over the top 16 bits of an fp32 value (sign, exponent, 7 mantissa bits): each such key is a
    contiguous range of floats, so #{m < x} = below[key] + (x > inside[key]), where below counts the midpoints
    under the whole range and inside is the one midpoint within it (+inf if none). Exact by construction; None if
    some range holds two midpoints (not so for NF4/FP4, whose midpoints are >= 0.0026 apart)."""
    b = torch.tensor(bounds, dtype=torch.float32)
    lo = (torch.arange(1 << 16, dtype=torch.int32) << 16).view(torch.float32)
    hi = ((torch.arange(1 << 16, dtype=torch.int32) << 16) | 0xFFFF).view(torch.float32)
    cmin, cmax = torch.minimum(lo, hi).view(-1, 1), torch.maximum(lo, hi).view(-1, 1)  # NaN keys: no midpoints
    within = (b >= cmin) & (b <= cmax)  # (65536, 15)
    if int(within.sum(1).max()) > 1:
        return None
    below = (b < cmin).sum(1).to(torch.uint8)
    inside = torch.where(within.any(1), (within * b).sum(1), torch.tensor(float("inf")))
    return below.numpy(), inside.numpy()


def _codes(scaled: torch.Tensor, bounds: tuple[float, ...], order: torch.Tensor, nf4_sorted: bool) -> torch.Tensor:
    """#{m : m < x} per element: what `torch.bucketize(x, bounds)` (right=False) returns, by two table lookups and
    one comparison (~4x faster than bucketize's per-element binary search here); 15 compare-and-add passes if
    the tables do not apply. Midpoints are fp32 values held exactly in Python floats."""
    tables = _tables(bounds)
    if tables is None:
        q = torch.zeros(scaled.shape, dtype=torch.uint8)
        for m in bounds:
            q += scaled > m
    else:
        x = scaled.numpy()  # numpy's take is ~2x torch's here; the key is the float's top 16 bits
        key = x.view(np.uint32) >> 16
        q = torch.from_numpy(np.take(tables[0], key) + (x > np.take(tables[1], key)))
    return q if nf4_sorted else order[q.long()]


def quantize_4bit(A: torch.Tensor, blocksize: int, code: torch.Tensor, threads: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A (any shape, fp32/fp16/bf16, CPU) -> (packed (ceil(numel/2), 1) uint8, absmax (n_blocks,) fp32), as
    bitsandbytes' `quantize_4bit` kernel returns them with quant_storage uint8."""
    assert blocksize % 2 == 0 and A.device.type == "cpu"
    bounds_t, order = _bounds(code)
    bounds = tuple(float(m) for m in bounds_t)
    nf4_sorted = bool(torch.equal(order, torch.arange(16, dtype=torch.uint8)))
    flat = A.contiguous().reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(n_blocks, dtype=torch.float32)
    per = max(1, CHUNK // blocksize) * blocksize  # whole blocks per task (an even number of elements)

    def task(start: int) -> None:
        end = min(start + per, full)
        x = flat[start:end].float().view(-1, blocksize)  # (blocks, blocksize) fp32
        am = x.abs().amax(dim=1)
        absmax[start // blocksize : end // blocksize] = am
        scaled = (x * (1.0 / am.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
        q = _codes(scaled, bounds, order, nf4_sorted)
        packed[start // 2 : end // 2] = (q[0::2] << 4) | q[1::2]

    starts = list(range(0, full, per))
    workers = max(1, min(threads or torch.get_num_threads() or os.cpu_count() or 1, len(starts)))
    if workers == 1:
        for s in starts:
            task(s)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(task, starts))
    if full < n:  # the partial last block: divided, not multiplied by the reciprocal (as bitsandbytes does)
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        scaled = torch.clamp(tail / am, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _codes(scaled, bounds, order, nf4_sorted)
        packed[full // 2 :] = (q[0::2] << 4) | q[1::2]
    return packed.unsqueeze(1), absmax

