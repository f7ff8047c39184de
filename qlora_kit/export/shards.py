"""Safetensors read and written one tensor at a time, so an export never holds a whole shard in memory.

Reading: the header (8-byte little-endian length, then JSON) gives every tensor's dtype, shape and byte range;
`read_tensor` copies one tensor (or some of its rows) with `os.preadv` into a fresh buffer. Unlike
`safe_open`, nothing stays memory-mapped, so the resident set is the tensors we hold, not the file pages we touched.

Writing: `ShardWriter` fixes the layout of a shard before any data exists (tensors sorted by alignment, as the
safetensors serializer does), reserves room for the header, and `pwrite`s each tensor, or each block of rows, at
its place as soon as it is computed. Tensors whose length is only known once computed (the bitsandbytes
quant-state blobs, ~170 bytes) go after the fixed part. The header is written last, padded with spaces to the
reserved room, which the format allows ("the header MAY be trailing padded with whitespace"). The `pwrite`s run on
one background thread, at most PENDING_MAX bytes behind, so computing the next tensor (the NF4 round trip of an exact
merge) overlaps writing the last (on the CPU machine here writing is half of a 1.6B merged export).
Format: https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import atomic
from ..errors import ConfigError, ExportError, ModelError
from ..model.load import weight_files as model_weight_files
from ..quant import mxfp4
from ..terms import parse_size

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # safetensors' own limit
PENDING_MAX = 64 << 20  # bytes handed to the writer thread and not yet written: the extra memory of writing behind


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors file: where its bytes are, without reading them."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int
    decoded: Callable[[], torch.Tensor] | None = None  # computed, not read: a pre-quantized base's Linear
    # weight is its stored codes dequantized (source.weight_index); dtype, shape and nbytes are the result's


# ---- reading ------------------------------------------------------------------------------------------------------


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of one safetensors file, in file order. Reads only the header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        size = path.stat().st_size
        out = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            out.append(TensorInfo(name, path, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + a, b - a))
            if 8 + n + b > size:
                raise ValueError(f"{name} ends past the end of the file")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ModelError(f"{path} is truncated or not a safetensors file ({e}); re-download or re-save it.") from None
    return sorted(out, key=lambda t: t.start)


def weight_files(folder: Path) -> list[Path]:
    """The base's safetensors files (model.weight_files' rules); export reads safetensors only."""
    files = model_weight_files(folder)
    if any(f.suffix != ".safetensors" for f in files):
        raise ModelError(f"{folder} holds pickle weights; export reads safetensors only. Convert the checkpoint first.")
    return files


def tensor_index(folder: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo over every shard of a model folder, in file then offset order (headers only). An MXFP4
    checkpoint's expert blocks + scales are one entry, read decoded to bf16 (quant/mxfp4.py): the tensor a 16-bit
    gpt-oss stores under that name, which every export then reads as such."""
    index: dict[str, TensorInfo] = {}
    for path in weight_files(folder):
        for info in read_header(path):
            if info.name in index:
                raise ModelError(f"{folder}: tensor {info.name} is stored twice "
                                 f"({index[info.name].file.name}, {path.name}).")
            index[info.name] = info
    if not mxfp4.is_mxfp4_folder(folder):
        return index
    try:
        return dict(mxfp4.decoded_entries(index.items(), lambda b, s: _decoded_info(b, s)))
    except ValueError as e:
        raise ModelError(f"{folder} (MXFP4): {e}; the checkpoint is incomplete (a missing shard?).") from None


def _decoded_info(blocks: TensorInfo, scales: TensorInfo) -> TensorInfo:
    """The (E, in, out) bf16 entry an MXFP4 blocks (E, out, G, 16) + scales (E, out, G) pair decodes to."""
    if len(blocks.shape) != 4 or blocks.shape[:3] != scales.shape or blocks.dtype != torch.uint8:
        raise ValueError(f"{blocks.name} {blocks.shape} and {scales.name} {scales.shape} are not MXFP4 "
                         "blocks (E, R, G, 16) uint8 and scales (E, R, G)")
    E, R, G, _ = blocks.shape
    shape = (E, G * 32, R)
    return TensorInfo(blocks.name[: -len(mxfp4.BLOCKS)], blocks.file, mxfp4.DTYPE, shape, blocks.start,
                      E * G * 32 * R * mxfp4.DTYPE.itemsize,
                      decoded=lambda: mxfp4.decode(read_tensor(blocks), read_tensor(scales)))


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor (or rows [i, j) of it) as a fresh CPU tensor; one `preadv` per call, no mapping kept."""
    if info.decoded is not None:  # the whole weight is decoded once either way (blocks straddle rows)
        t = info.decoded()
        return t if rows is None else t[rows[0]:rows[1]].clone()
    n_rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // max(n_rows, 1)
    i, j = rows if rows is not None else (0, n_rows)
    shape = (j - i, *info.shape[1:]) if info.shape else ()
    buf = torch.empty((j - i) * row_bytes, dtype=torch.uint8)
    view, offset, done = memoryview(buf.numpy()), info.start + i * row_bytes, 0
    with open(info.file, "rb", buffering=0) as f:
        while done < len(view):
            got = os.preadv(f.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise ModelError(f"{info.file} ends inside tensor {info.name} (truncated file).")
            done += got
    return buf.view(info.dtype).reshape(shape)


def row_blocks(shape: tuple[int, ...], itemsize: int, block_bytes: int = 16 << 20):
    """[(i, j), ...] blocks of rows of about `block_bytes` each (one block for 0-d or 1-d tensors)."""
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    row = itemsize * max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, block_bytes // row)
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


# ---- sizes and planning (pure) ------------------------------------------------------------------------------------

def max_shard_bytes(text: str | int) -> int:
    """--max-shard-size -> bytes by the one size rule (`terms.parse_size`); at least 1 KB."""
    try:
        size = parse_size(text, "--max-shard-size")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    if size < 1024:
        raise ExportError(f"--max-shard-size {text!r} is {size} bytes; use at least 1KB (e.g. 2GB).")
    return size


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Split items (kept in order) into shards of at most `max_bytes`; an item larger than that gets a shard of its
    own (as transformers does). Returns item indices per shard."""
    shards: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not shards or total + n > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += n
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def layout(entries: list[Entry]) -> dict[str, tuple[int, int]]:
    """name -> (start, end) within the data section: widest dtype first, then by name (as safetensors' own
    serializer orders them), so every tensor starts at a multiple of its element size."""
    out, pos = {}, 0
    for e in sorted(entries, key=lambda e: (-e.dtype.itemsize, e.name)):
        out[e.name] = (pos, pos + e.nbytes)
        pos += e.nbytes
    return out


def _header_json(items: dict[str, dict], metadata: dict[str, str]) -> bytes:
    return json.dumps({"__metadata__": metadata, **items}, separators=(",", ":")).encode()


class ShardWriter:
    """One safetensors file written in place, tensor by tensor (see the module docstring).

    `entries` have known shapes; `tails` are 1-d uint8 tensors of at most `tail_max` bytes each whose length is
    known only when computed. Every entry and tail must be written exactly once before `close()`. `write` returns
    before the bytes are written (a thread writes them): the caller must not change a tensor it has passed; an
    error of the writing is raised by a later `write` or by `close`."""

    def __init__(self, path: Path, entries: list[Entry], tails: list[str] = (), tail_max: int = 4096,
                 metadata: dict[str, str] | None = None):
        self.path, self.entries, self.tails = path, {e.name: e for e in entries}, list(tails)
        self.layout = layout(entries)
        self.fixed = sum(e.nbytes for e in entries)
        self.metadata = metadata or {"format": "pt"}
        big = 10**15  # offsets of up to a petabyte: the longest the header can become
        bound = {e.name: {"dtype": CODES[e.dtype], "shape": list(e.shape), "data_offsets": [big, big]} for e in entries}
        bound |= {t: {"dtype": "U8", "shape": [tail_max], "data_offsets": [big, big]} for t in tails}
        room = len(_header_json(bound, self.metadata))
        self.room = room + (-room) % 8  # data starts 8-byte aligned
        self.tail_max, self.tail_data, self.written = tail_max, {}, {}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._pending: deque[tuple[Future, int]] = deque()  # (the pwrite, its bytes), oldest first
        self._pending_bytes = 0

    @property
    def data_start(self) -> int:
        return 8 + self.room

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def _behind(self, data: memoryview, offset: int) -> None:
        """Queue a pwrite (the memoryview keeps its tensor alive until written), first waiting for the oldest ones
        while more than PENDING_MAX bytes would be outstanding."""
        while self._pending and self._pending_bytes + len(data) > PENDING_MAX:
            self._wait_oldest()
        self._pending.append((self._io.submit(self._pwrite, data, offset), len(data)))
        self._pending_bytes += len(data)

    def _wait_oldest(self) -> None:
        future, n = self._pending.popleft()
        self._pending_bytes -= n
        future.result()  # raises the pwrite's OSError (disk full...) here, in the caller

    def _drain(self) -> None:
        while self._pending:
            self._wait_oldest()

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write `tensor` as rows [row_start, row_start + len) of entry `name` (all of it by default)."""
        e = self.entries[name]
        assert tensor.dtype == e.dtype and tuple(tensor.shape[1:]) == tuple(e.shape[1:]), (name, tensor.shape, e)
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        start, end = self.layout[name]
        row_bytes = e.nbytes // e.shape[0] if e.shape else e.nbytes
        offset = start + row_start * row_bytes
        assert offset + len(data) <= end, f"{name}: rows past the end of the tensor"
        self._behind(data, self.data_start + offset)
        self.written[name] = self.written.get(name, 0) + len(data)

    def write_tail(self, name: str, tensor: torch.Tensor) -> None:
        assert name in self.tails and tensor.dtype == torch.uint8 and tensor.dim() == 1, name
        assert tensor.numel() <= self.tail_max, f"{name}: {tensor.numel()} bytes > reserved {self.tail_max}"
        self.tail_data[name] = tensor.cpu().contiguous()

    def close(self) -> int:
        """Write the tails and the header; fsync; return the file size."""
        self._drain()
        incomplete = [n for n, e in self.entries.items() if self.written.get(n, 0) != e.nbytes]
        incomplete += [t for t in self.tails if t not in self.tail_data]
        assert not incomplete, f"{self.path.name}: not written: {incomplete[:3]}"
        items = {n: {"dtype": CODES[self.entries[n].dtype], "shape": list(self.entries[n].shape),
                     "data_offsets": list(self.layout[n])} for n in self.entries}
        pos = self.fixed
        for name in self.tails:
            t = self.tail_data[name]
            self._pwrite(memoryview(t.numpy()), self.data_start + pos)
            items[name] = {"dtype": "U8", "shape": [t.numel()], "data_offsets": [pos, pos + t.numel()]}
            pos += t.numel()
        header = _header_json(dict(sorted(items.items())), self.metadata)
        assert len(header) <= self.room
        self._pwrite(memoryview(struct.pack("<Q", self.room) + header.ljust(self.room, b" ")), 0)
        os.ftruncate(self.fd, self.data_start + pos)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self._io.shutdown()
        return self.data_start + pos

    def abort(self) -> None:
        """Close without finishing (after an error): queued writes are cancelled and the one running is waited for,
        so no pwrite ever reaches a closed (or reused) descriptor."""
        for future, _ in self._pending:
            future.cancel()
        self._io.shutdown(wait=True)
        self._pending.clear()
        self._pending_bytes = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """transformers' `model.safetensors.index.json` (total_size: bytes of tensor data, as transformers counts)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    atomic.write_text(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
