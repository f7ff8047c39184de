"""Tokenize once: records -> token ids + loss mask, held compactly and cached on disk.

Label mask, one method for every shape: a record is rendered to ONE string plus the character spans that take loss
(data_formats.render); the string is tokenized once and a token takes loss iff its offset range overlaps a span.
Masking "len(tokenize(prompt))" tokens breaks when a tokenizer merges across the prompt/response boundary;
tokenizing the pieces apart makes sequences the tokenizer never makes on whole text (SentencePiece adds a "▁" at each
piece's start). A token straddling the boundary takes loss (the model must emit it) and is counted in
stats["boundary_merges"]. Only tokenizers without offsets (pure-Python ones) go piece by piece. Template text is
tokenized with add_special_tokens=False, as `apply_chat_template` does: a template writes BOS itself when its model
wants one, so BOS is never doubled.

Storage: every example's ids in one flat int32 tensor, its loss mask in one bool tensor, and int64 offsets: about
5 bytes a token (two Python lists of ints cost ~70), so a 1 GB JSONL tokenizes within about its own size in RAM.
Records stream through one at a time. The cache entry (a folder of raw arrays + meta.json: no pickle, nothing
executable) is named by sha256 of the data's bytes, the tokenizer (its serialized tokenizer.json, chat template,
special tokens) and every data setting that changes tokens; it is written with atomic.atomic_folder, so a killed
run never leaves half a cache.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import formats as data_formats, preference as data_preference, sources as data_sources
from ..atomic import atomic_folder
from ..config import DataConfig

CACHE_VERSION = 2  # bump when tokenization or masking changes: old cache files then stop matching


@dataclass(frozen=True)
class Tokenized:
    """All records' examples (truncated, before split and packing). Example i: ids[offsets[i]:offsets[i+1]]."""

    ids: torch.Tensor  # (N,) int32: every token of every example, concatenated
    keep: torch.Tensor  # (N,) bool: the token is a label (takes loss)
    offsets: torch.Tensor  # (n+1,) int64
    records: torch.Tensor  # (n,) int64: the 0-based record each example came from (the split is by record)
    labels: torch.Tensor  # (n,) int32: tokens of each example that take loss (its first token never does)
    roles: torch.Tensor  # (n,) int8: 0 SFT; preference: data_preference.CHOSEN / REJECTED
    stats: dict[str, int]  # records, truncated, dropped, boundary_merges, longest_prompt

    def __len__(self) -> int:
        return len(self.records)


def bos_prefix(tokenizer: Any, text: str, templated: bool) -> list[int]:
    """[BOS] where the tokenizer normally prepends one (Llama-style) and the text does not already start with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if templated or bos is None or (tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
        return []
    adds = tokenizer("a")["input_ids"][:1] == [bos] != tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    return [bos] if adds else []


def tokenize(tokenizer: Any, text: str, spans: list[tuple[int, int]], bos: list[int], eos: int | None,
             train_all: bool) -> tuple[list[int], list[bool], bool]:
    """-> (input_ids, takes-loss flags, whether a token straddles a span boundary). `bos`: [] or [BOS id] to
    prepend; `eos`: an id to append (plain formats: so the model learns to stop; an id, not text)."""
    ids, keep, merged = list(bos), [train_all] * len(bos), False
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # no offsets: transformers' Python and mistral-common backends
        enc = None
    if enc is not None and enc["input_ids"]:
        off = torch.tensor(enc["offset_mapping"], dtype=torch.int64)  # (T, 2) character [start, end) per token
        a, b = off[:, 0], off[:, 1]
        takes = torch.full((len(off),), train_all)
        straddles = torch.zeros((), dtype=torch.bool)
        for s, e in spans:
            takes |= (a < e) & (b > s)  # the token overlaps the span
            straddles |= (((a < s) & (s < b)) | ((a < e) & (e < b))).any()
        ids += enc["input_ids"]
        keep += takes.tolist()
        merged = bool(straddles)
    elif enc is None:  # tokenize piece by piece instead
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            keep += [train_all or any(s <= a < e for s, e in spans)] * len(piece)
    if eos is not None:
        ids.append(eos)
        keep.append(True)
    return ids, keep, merged


def tokenize_all(cfg: DataConfig, tokenizer: Any) -> Tokenized:
    """Stream every record through validate -> render -> tokenize -> truncate into flat arrays."""
    templated = data_formats.templated(tokenizer, cfg.format)
    train_all = cfg.train_on_prompt or cfg.format == "text"  # text has no prompt (this also labels an added BOS)
    bos_once = bos_prefix(tokenizer, "", templated)  # asked once: two tokenizer calls, not two per record
    bos_token = getattr(tokenizer, "bos_token", None)
    ids, keep, offsets, records, labels = array("i"), array("b"), array("q", [0]), array("q"), array("i")
    # No token covers more characters than its vocabulary string is long, so a prefix of max_length x the longest
    # such string holds at least max_length tokens; x8 and at least 100k characters keep the cut far from them
    # (only the pre-token at the cut can tokenize differently).
    cut = max(100_000, 8 * cfg.max_length * max(map(len, tokenizer.get_vocab()), default=16))
    roles = array("b")
    stats = {"records": 0, "truncated": 0, "dropped": 0, "boundary_merges": 0, "longest_prompt": 0}
    for r, (place, raw) in enumerate(data_sources.read(cfg)):
        stats["records"] += 1
        if cfg.format == "preference":  # a pair: two examples of one record, both kept or both dropped
            parts = data_preference.pieces(data_preference.validate(raw, place), tokenizer, cfg, place)
        else:
            record = data_formats.validate(raw, cfg.format, place)
            parts = [(0, *data_formats.render(record, tokenizer, cfg, place), templated)]
        made = []
        for role, text, spans, tmpl in parts:
            bos = [] if bos_token and text.startswith(bos_token) else bos_once if tmpl == templated else \
                bos_prefix(tokenizer, text, tmpl)
            eos = tokenizer.eos_token_id if not tmpl else None
            text = text[:cut]  # only the first max_length tokens are kept: a 10 MB record need not be tokenized whole
            t_ids, t_keep, merged = tokenize(tokenizer, text, spans, bos, eos, train_all)
            stats["boundary_merges"] += merged
            stats["longest_prompt"] = max(stats["longest_prompt"], next((j for j, k in enumerate(t_keep) if k),
                                                                        len(t_keep)))
            if len(t_ids) > cfg.max_length:
                stats["truncated"] += 1
                t_ids, t_keep = t_ids[: cfg.max_length], t_keep[: cfg.max_length]
            made.append((role, t_ids, t_keep))
        if not all(any(t_keep[1:]) for _, _, t_keep in made):  # keep[0] is never a target: nothing precedes it
            stats["dropped"] += 1  # nothing left to learn from (the prompt alone fills max_length)
            continue
        for role, t_ids, t_keep in made:
            ids.extend(t_ids)
            keep.extend(t_keep)
            offsets.append(len(ids))
            records.append(r)
            labels.append(sum(t_keep[1:]))
            roles.append(role)
    as_tensor = lambda a, dtype: torch.frombuffer(a, dtype=dtype) if len(a) else torch.zeros(0, dtype=dtype)  # noqa: E731
    return Tokenized(as_tensor(ids, torch.int32), as_tensor(keep, torch.int8).bool(), as_tensor(offsets, torch.int64),
                     as_tensor(records, torch.int64), as_tensor(labels, torch.int32), as_tensor(roles, torch.int8),
                     stats)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the tokens: the serialized fast tokenizer (vocab, merges, normalizer, post-processor),
    else the vocabulary; plus the chat template and the special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [getattr(tokenizer, "chat_template", None), getattr(tokenizer, "bos_token", None),
             getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None),
             getattr(tokenizer, "bos_token_id", None), type(tokenizer).__name__]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def cache_key(cfg: DataConfig, tokenizer: Any) -> str:
    settings = {k: getattr(cfg, k) for k in ("format", "max_length", "train_on_prompt", "system_prompt", "columns",
                                             "split", "subset", "assistant_turns")}
    parts = {"version": CACHE_VERSION, "data": data_sources.fingerprint(cfg),
             "tokenizer": tokenizer_fingerprint(tokenizer), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


FIELDS = {"ids": torch.int32, "keep": torch.bool, "offsets": torch.int64, "records": torch.int64,
          "labels": torch.int32, "roles": torch.int8}


def cache_path(cfg: DataConfig, tokenizer: Any) -> Path:
    return data_sources.data_cache_root() / "tokens" / cache_key(cfg, tokenizer)


def _save(out: Tokenized, path: Path, source: str) -> None:
    """A folder: one raw little-endian array per field (written straight from the tensor's memory: no copy, unlike
    serializing to one bytes object) and meta.json (element counts, stats). Nothing in it is executable."""
    with atomic_folder(path, replace=True) as tmp:
        for name in FIELDS:
            getattr(out, name).numpy().tofile(tmp / f"{name}.bin")
        meta = {"version": CACHE_VERSION, "source": source, "stats": out.stats,
                "counts": {name: getattr(out, name).numel() for name in FIELDS}}
        (tmp / "meta.json").write_text(json.dumps(meta))


def _load(path: Path) -> Tokenized:
    meta = json.loads((path / "meta.json").read_text())
    arrays = {}
    for name, dtype in FIELDS.items():
        n = meta["counts"][name]
        if (path / f"{name}.bin").stat().st_size != n * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"{path / name}.bin has the wrong size")
        arrays[name] = torch.from_file(str(path / f"{name}.bin"), shared=False, size=n, dtype=dtype) if n else \
            torch.zeros(0, dtype=dtype)
    return Tokenized(**arrays, stats=meta["stats"])


def load_or_tokenize(cfg: DataConfig, tokenizer: Any) -> Tokenized:
    """The cached examples when this data, tokenizer and settings were tokenized before; else tokenize and save."""
    if not cfg.cache:
        return tokenize_all(cfg, tokenizer)
    path = cache_path(cfg, tokenizer)
    if (path / "meta.json").is_file():
        try:
            return _load(path)
        except (OSError, KeyError, ValueError, RuntimeError):
            pass  # a damaged cache entry: tokenize again and replace it
    out = tokenize_all(cfg, tokenizer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(out, path, str(cfg.path))
    except OSError:  # a read-only or full cache dir costs the cache, not the run
        pass
    return out
