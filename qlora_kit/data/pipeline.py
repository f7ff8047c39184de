"""Data: the public entry. records -> (data_sources) -> shape check and render (data_formats) -> tokens and loss mask,
tokenized once and cached (data_tokens) -> split by record -> packing (packing) -> batches (collate, BatchStream).

Public API (train, generate and eval use only these): `build(cfg, tokenizer, seed) -> Dataset` (train/val split,
packed if asked); `examples(cfg, tokenizer) -> Examples` (every record's example, no split, no packing: what an
evaluation reads); `load_records(cfg_or_path, fmt)` (validated canonical records); `check(cfg)` (validate without
a tokenizer, before a long model load); `render_prompt` / `encode_prompt` (the prompt exactly as trained);
`collate`, `BatchStream`, `pad_token_id`.
"""

from __future__ import annotations

import hashlib
import json
import random
from itertools import accumulate
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import formats as data_formats, preference as data_preference, sources as data_sources, tokens as data_tokens
from ..config import DataConfig
from .formats import render_prompt
from ..errors import DataError
from .example import Example
from .packing import join, plan
from ..terms import IGNORE

Record = dict[str, Any]
__all__ = ["IGNORE", "Example", "Examples", "Dataset", "build", "examples", "load_records", "check", "render_prompt",
           "encode_prompt", "pad_token_id", "collate", "BatchStream"]


class Examples(Sequence[Example]):
    """A read-only sequence of Examples over the compact token arrays of data_tokens.Tokenized.

    Row r joins the examples index[starts[r]:starts[r+1]]: one each when unpacked; several, with position ids
    restarting per document and each document's first label IGNORE, when packed (packing.py)."""

    def __init__(self, tok: data_tokens.Tokenized, index: list[int], starts: list[int] | None = None):
        self.tok, self.index = tok, torch.tensor(index, dtype=torch.int64)
        self.packed = starts is not None
        self.starts = torch.tensor(starts if starts is not None else range(len(index) + 1), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _one(self, i: int) -> tuple[list[int], list[int]]:
        a, b = int(self.tok.offsets[i]), int(self.tok.offsets[i + 1])
        ids = self.tok.ids[a:b].tolist()
        return ids, [t if k else IGNORE for t, k in zip(ids, self.tok.keep[a:b].tolist())]

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        if not -len(self) <= r < len(self):
            raise IndexError(r)
        r %= len(self)
        members = self.index[int(self.starts[r]) : int(self.starts[r + 1])].tolist()
        if not self.packed:
            return Example(*self._one(members[0]))
        return join([Example(*self._one(i)) for i in members])

    def lengths(self) -> list[int]:
        """Tokens of each row (without building the rows)."""
        n = (self.tok.offsets[1:] - self.tok.offsets[:-1])[self.index]
        return torch.zeros(len(self), dtype=torch.int64).index_add_(
            0, torch.repeat_interleave(torch.arange(len(self)), self.starts[1:] - self.starts[:-1]), n).tolist()

    def label_tokens(self) -> int:
        """Tokens that take loss. A document's first token never does (nothing precedes it, or, packed, its label is
        IGNORE), so this is the same number packed and unpacked."""
        return int(self.tok.labels[self.index].sum())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


class Units(Sequence[data_preference.Unit]):
    """A read-only sequence of preference units (data_preference.units: pairs, or kto's single examples)."""

    def __init__(self, tok: data_tokens.Tokenized, groups: list[tuple[int, ...]]):
        self.tok, self.groups, self._all = tok, groups, Examples(tok, [])
        single = bool(groups) and all(len(g) == 1 for g in groups)  # kto's units: one answer each
        self.partners = data_preference.kl_partners([int(tok.records[g[0]]) for g in groups]) if single else None

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        group = self.groups[i]
        partner = self.partners[i] if self.partners else None
        kl = None if partner is None else Example(*self._all._one(self.groups[partner][0]))
        return data_preference.Unit(tuple(Example(*self._all._one(j)) for j in group),
                                    int(self.tok.roles[group[0]]) == data_preference.CHOSEN, group, kl)

    def lengths(self) -> list[int]:
        """Tokens of each unit's answers (both answers of a pair)."""
        n = (self.tok.offsets[1:] - self.tok.offsets[:-1]).tolist()
        return [sum(n[j] for j in g) for g in self.groups]

    def label_tokens(self) -> int:
        return sum(int(self.tok.labels[j]) for g in self.groups for j in g)


@dataclass(frozen=True)
class Dataset:
    train: Examples | Units  # Units: data.format preference
    val: Examples | Units
    stats: dict[str, int]  # records, truncated, dropped, boundary_merges, train/val_examples, train/val_tokens, ...


def _cfg(cfg_or_path: DataConfig | str | Path, fmt: str | None) -> DataConfig:
    if isinstance(cfg_or_path, DataConfig):
        return cfg_or_path
    if fmt not in data_formats.FORMAT_HELP:
        raise DataError(f"unknown data format {fmt!r}; "
                        f"set data.format to one of {', '.join(data_formats.FORMAT_HELP)}.")
    return DataConfig(path=str(cfg_or_path), format=fmt)  # type: ignore[arg-type]


def _records(cfg: DataConfig) -> Iterator[Record]:
    for place, raw in data_sources.read(cfg):
        yield data_preference.validate(raw, place) if cfg.format == "preference" else \
            data_formats.validate(raw, cfg.format, place)


def load_records(cfg_or_path: DataConfig | str | Path, fmt: str | None = None) -> list[Record]:
    """Read and validate every record (columns mapped, canonical shape: sharegpt becomes {"messages"}). DataError
    names the file and 1-based line or row. Holds every record in memory: for large data use `examples`."""
    return list(_records(_cfg(cfg_or_path, fmt)))


def check(cfg: DataConfig) -> None:
    """Validate every record without keeping them (and without a tokenizer), so a bad line fails before a long model
    load. Remembered per data content and shape settings: the same data is not checked twice."""
    settings = [cfg.format, cfg.columns, cfg.split, cfg.subset, data_tokens.CACHE_VERSION]
    key = hashlib.sha256(json.dumps([data_sources.fingerprint(cfg), settings]).encode()).hexdigest()[:32]
    marker = data_sources.data_cache_root() / "checked" / key
    if cfg.cache and marker.is_file():
        return
    for _ in _records(cfg):
        pass
    if cfg.cache:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass


def examples(cfg: DataConfig, tokenizer: Any) -> Examples:
    """Every record's example, tokenized and masked as training does (cached), in file order; no split, no
    packing. Records with no trainable token left after truncation are dropped (counted in .tok.stats)."""
    tok = data_tokens.load_or_tokenize(cfg, tokenizer)
    return Examples(tok, list(range(len(tok))))


def encode_prompt(
    record_or_question: str | Record, tokenizer: Any, fmt: str, system_prompt: str | None = None,
    tools: list | None = None,
) -> list[int]:
    """`render_prompt` tokenized as `build` tokenizes it (with BOS exactly where training has one)."""
    fmt = data_formats.prompt_format(fmt)
    text = render_prompt(record_or_question, tokenizer, fmt, system_prompt, tools)
    bos = data_tokens.bos_prefix(tokenizer, text, data_formats.templated(tokenizer, fmt))
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_token_id(tokenizer: Any) -> int:
    """The id `collate` pads with: the pad token, else EOS (pad positions are masked, so the value is moot)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token, so batches cannot be padded.")
    return int(pad)


def build(cfg: DataConfig, tokenizer: Any, seed: int, paired: bool = True) -> Dataset:
    """Tokenize (or load the cache); split by record (seeded); pack the training split if asked. Preference data:
    train and val are Units (`paired`: (chosen, rejected) pairs, else kto's single examples).

    Validation examples are never packed: validation loss is then measured per example, without cross-talk."""
    tok = data_tokens.load_or_tokenize(cfg, tokenizer)
    n_records = tok.stats["records"]
    order = list(range(n_records))
    random.Random(seed).shuffle(order)
    n_val = 0
    if cfg.val_fraction > 0 and n_records >= 2:
        n_val = min(n_records - 1, max(1, round(cfg.val_fraction * n_records)))
    val_records = set(order[:n_val])
    is_val = [r in val_records for r in tok.records.tolist()]
    train_idx = [i for i, v in enumerate(is_val) if not v]
    val_idx = [i for i, v in enumerate(is_val) if v]
    if not train_idx:
        longest = tok.stats["longest_prompt"]
        raise DataError(
            f"{cfg.path}: no example has a trainable token left: every example is longer than data.max_length="
            f"{cfg.max_length} before its response starts (the longest prompt has {longest} tokens). Raise "
            f"data.max_length, e.g. --set data.max_length={max(2 * cfg.max_length, longest + 64)}."
        )
    if cfg.format == "preference":
        roles, recs = tok.roles.tolist(), tok.records.tolist()
        train, val = (Units(tok, data_preference.units(roles, recs, idx, paired, str(cfg.path)))
                      for idx in (train_idx, val_idx))
    elif cfg.packing:
        lengths = (tok.offsets[1:] - tok.offsets[:-1])[train_idx].tolist()
        rows = plan(lengths, cfg.max_length, random.Random(seed + 1))
        train = Examples(tok, [train_idx[i] for row in rows for i in row], [0, *accumulate(map(len, rows))])
    else:
        train = Examples(tok, train_idx)
    if cfg.format != "preference":
        val = Examples(tok, val_idx)
    stats = {k: v for k, v in tok.stats.items() if k != "longest_prompt"}
    stats.update(train_examples=len(train), val_examples=len(val), val_tokens=sum(val.lengths()))
    stats.update(train_tokens=sum(train.lengths()), train_label_tokens=train.label_tokens())
    return Dataset(train=train, val=val, stats=stats)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row -> input_ids, attention_mask, labels: each (B, T) int64; labels IGNORE on pad.

    A batch of packed rows also gets position_ids (B, T) int64, restarting at 0 for each document; the padding of a
    row restarts at 0 too (its own "document", attended by no real token since it comes last). The model then runs
    with position_ids and attention_mask=None (packing.py); attention_mask still marks the real tokens."""
    shape = (len(examples), max(len(e.input_ids) for e in examples))  # (B, T)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    positions = torch.arange(shape[1]).repeat(shape[0], 1) if packed else None
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = 1
        if positions is not None:
            positions[row, :n] = torch.tensor(e.position_ids if e.position_ids is not None else range(n))
            positions[row, n:] = torch.arange(shape[1] - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if positions is not None:
        batch["position_ids"] = positions
    return batch


class BatchStream:
    """Infinite, deterministic, resumable batches over `examples`.

    Epoch e visits the examples in the order randperm(n) drawn from a generator seeded from (seed, e), so a position
    is just (epoch, index) and resuming needs no saved permutation. A batch that runs past an epoch's end is filled
    from the next epoch: every batch has exactly batch_size rows (the same loss scale every step)."""

    epoch: int  # position: the epoch, and the index into that epoch's order of the next example
    index: int
    _order: list[int]

    def __init__(self, examples: Sequence, batch_size: int, seed: int, pad_id: int, collate_fn=collate) -> None:
        if not examples:
            raise DataError("there are no training examples to iterate over; check data.path and data.max_length.")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.collate = collate_fn  # preference data: data_preference.collate (units -> one concatenated batch)
        self.load_state_dict({"epoch": 0, "index": 0})

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked: list = []
        while len(picked) < self.batch_size:
            if self.index == len(self.examples):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            picked.append(self.examples[self._order[self.index]])
            self.index += 1
        return self.collate(picked, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.examples):
            raise DataError(
                f"data position {state} does not fit {len(self.examples)} training examples; was the data changed?"
            )
        self.epoch, self.index = epoch, index
        self._order = self._permutation(epoch)
