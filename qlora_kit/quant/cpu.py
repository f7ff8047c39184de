"""Blockwise 4-bit (NF4/FP4) codes on the CPU, bit for bit what bitsandbytes computes, several times faster.

bitsandbytes (0.50) quantizes 4-bit on the CPU in plain torch over the whole flattened weight at once: one fp32
copy, |x|, a per-block max, x · (1/absmax), a clamp, `torch.bucketize` against the 15 midpoints of the codebook
(a binary search per element, one thread), then nibble packing, each pass a new (numel,) temporary that does not
fit in cache. That is 65% of an exact (dequantized-base) merge on the CPU, and what loading a model for training
pays too (bench/results/merge.md). Here the same arithmetic runs over chunks of whole blocks (1 MB of fp32, so
the passes stay in L2), on a pool of threads (torch's and numpy's kernels release the GIL), written straight into
preallocated outputs. Exactly the same float operations in the same order, so the codes and constants are identical:

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
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

CHUNK = 1 << 18  # elements per task (1 MB of fp32): each pass stays in L2 (2 MiB per core here), and the
# per-task Python overhead (~70 us, under the GIL) is small next to the work: 2x faster on 2 threads than 1 << 16


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


def _codes(x: np.ndarray, bounds: tuple[float, ...], order: np.ndarray | None) -> np.ndarray:
    """(n,) fp32 -> (n,) uint8 #{m : m < x} per element: what `torch.bucketize(x, bounds)` (right=False) returns,
    by two table lookups and one comparison (~10x faster than bucketize's per-element binary search here); 15
    compare-and-add passes if the tables do not apply. Then mapped through `order` (None: the codebook is sorted).
    Midpoints are fp32 values held exactly in Python floats. numpy, not torch: its take is ~2x torch's indexing."""
    tables = _tables(bounds)
    if tables is None:
        q = np.zeros(x.shape, dtype=np.uint8)
        for m in bounds:
            q += x > np.float32(m)
    else:
        key = x.view(np.uint32) >> 16  # the float's top 16 bits
        q = np.take(tables[0], key)
        q += x > np.take(tables[1], key)
    return q if order is None else np.take(order, q)


def _pack(q: np.ndarray) -> np.ndarray:
    """(2k,) uint8 codes < 16 -> (k,) uint8 (q[2i] << 4) | q[2i + 1], through a uint16 view of each pair (little
    endian: q[2i] is the low byte) instead of two strided slices: one contiguous pass."""
    assert sys.byteorder == "little"
    q16 = q.view(np.uint16)
    return ((q16 << 4) | (q16 >> 8)).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    """Kept for the process: starting threads costs ~2 ms per call, more than quantizing a 576 x 576 weight."""
    return ThreadPoolExecutor(workers, thread_name_prefix="quant4_cpu")


def quantize_4bit(A: torch.Tensor, blocksize: int, code: torch.Tensor, threads: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A (any shape, fp32/fp16/bf16, CPU) -> (packed (ceil(numel/2), 1) uint8, absmax (n_blocks,) fp32), as
    bitsandbytes' `quantize_4bit` kernel returns them with quant_storage uint8."""
    assert blocksize % 2 == 0 and A.device.type == "cpu"
    bounds_t, order_t = _bounds(code)
    bounds = tuple(float(m) for m in bounds_t)
    order = None if torch.equal(order_t, torch.arange(16, dtype=torch.uint8)) else order_t.numpy()  # NF4: sorted
    flat = A.detach().contiguous().reshape(-1)  # the pool's threads do not inherit the caller's no_grad
    n = flat.numel()
    full = n - n % blocksize
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(n_blocks, dtype=torch.float32)
    packed_np = packed.numpy()  # the same memory
    threads = threads or torch.get_num_threads() or os.cpu_count() or 1
    # whole blocks per task (an even number of elements); a small weight (576 x 576 in the demo model) is still
    # split over every thread rather than run as one task
    per = max(1, min(CHUNK, -(-full // threads)) // blocksize) * blocksize

    def task(start: int) -> None:
        end = min(start + per, full)
        x = flat[start:end].float().view(-1, blocksize)  # (blocks, blocksize) fp32
        am = x.abs().amax(dim=1)
        absmax[start // blocksize : end // blocksize] = am
        scaled = (x * (1.0 / am.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
        packed_np[start // 2 : end // 2] = _pack(_codes(scaled.numpy(), bounds, order))

    starts = list(range(0, full, per))
    workers = max(1, min(threads, len(starts)))
    if workers == 1:
        for s in starts:
            task(s)
    else:
        # One torch thread per task: each task's ops on 2^18 elements would otherwise fork torch's own workers too,
        # 2 x 2 threads on 2 cores (2x slower). A thread takes torch's setting at its first op, so the pool's
        # threads are started (on first use) under 1; the caller's setting is restored after.
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            list(_pool(workers).map(task, starts))
        finally:
            torch.set_num_threads(before)
    if full < n:  # the partial last block: divided, not multiplied by the reciprocal (as bitsandbytes does)
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        scaled = torch.clamp(tail / am, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        packed_np[full // 2 :] = _pack(_codes(scaled.numpy(), bounds, order))
    return packed.unsqueeze(1), absmax

