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
Records stream through one at a time. The cache file (safetensors: no pickle) is named by sha256 of the data's
bytes, the tokenizer (its serialized tokenizer.json, chat template, special tokens) and every data setting that
changes tokens; it is written with atomic.atomic_file, so a killed run never leaves half a cache.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data_formats, data_sources
from .atomic import atomic_file
from .config import DataConfig

CACHE_VERSION = 1  # bump when tokenization or masking changes: old cache files then stop matching


@dataclass(frozen=True)
class Tokenized:
    """All records' examples (truncated, before split and packing). Example i: ids[offsets[i]:offsets[i+1]]."""

    ids: torch.Tensor  # (N,) int32: every token of every example, concatenated
    keep: torch.Tensor  # (N,) bool: the token is a label (takes loss)
    offsets: torch.Tensor  # (n+1,) int64
    records: torch.Tensor  # (n,) int64: the 0-based record each example came from (the split is by record)
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
    if enc is not None:
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            ids.append(tok)
            keep.append(train_all or any(a < e and b > s for s, e in spans))  # overlap test
            merged |= any(a < s < b or a < e < b for s, e in spans)
    else:  # tokenize piece by piece instead
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
    eos = tokenizer.eos_token_id if not templated else None
    bos_once = bos_prefix(tokenizer, "", templated)  # asked once: two tokenizer calls, not two per record
    bos_token = getattr(tokenizer, "bos_token", None)
    ids, keep, offsets, records = array("i"), array("b"), array("q", [0]), array("q")
    stats = {"records": 0, "truncated": 0, "dropped": 0, "boundary_merges": 0, "longest_prompt": 0}
    for r, (place, raw) in enumerate(data_sources.read(cfg)):
        stats["records"] += 1
        record = data_formats.validate(raw, cfg.format, place)
        text, spans = data_formats.render(record, tokenizer, cfg, place)
        bos = [] if bos_token and text.startswith(bos_token) else bos_once
        t_ids, t_keep, merged = tokenize(tokenizer, text, spans, bos, eos, train_all)
        stats["boundary_merges"] += merged
        stats["longest_prompt"] = max(stats["longest_prompt"], next((j for j, k in enumerate(t_keep) if k),
                                                                    len(t_keep)))
        if len(t_ids) > cfg.max_length:
            stats["truncated"] += 1
            t_ids, t_keep = t_ids[: cfg.max_length], t_keep[: cfg.max_length]
        if not any(t_keep[1:]):  # keep[0] is never a target: nothing precedes it
            stats["dropped"] += 1  # nothing left to learn from (the prompt alone fills max_length)
            continue
        ids.extend(t_ids)
        keep.extend(t_keep)
        offsets.append(len(ids))
        records.append(r)
    as_tensor = lambda a, dtype: torch.frombuffer(a, dtype=dtype) if len(a) else torch.zeros(0, dtype=dtype)  # noqa: E731
    return Tokenized(as_tensor(ids, torch.int32), as_tensor(keep, torch.int8).bool(), as_tensor(offsets, torch.int64),
                     as_tensor(records, torch.int64), stats)


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


def cache_path(cfg: DataConfig, tokenizer: Any) -> Path:
    return data_sources.data_cache_root() / "tokens" / f"{cache_key(cfg, tokenizer)}.safetensors"


def load_or_tokenize(cfg: DataConfig, tokenizer: Any) -> Tokenized:
    """The cached examples when this data, tokenizer and settings were tokenized before; else tokenize and save."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    if not cfg.cache:
        return tokenize_all(cfg, tokenizer)
    path = cache_path(cfg, tokenizer)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                stats = json.loads(f.metadata()["stats"])
            t = load_file(str(path))
            return Tokenized(t["ids"], t["keep"], t["offsets"], t["records"], stats)
        except (SafetensorError, OSError, KeyError, ValueError):
            pass  # a damaged cache file: tokenize again and replace it
    out = tokenize_all(cfg, tokenizer)
    tensors = {"ids": out.ids, "keep": out.keep, "offsets": out.offsets, "records": out.records}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"stats": json.dumps(out.stats), "source": str(cfg.path)})
    except (OSError, SafetensorError):  # a read-only or full cache dir costs the cache, not the run
        pass
    return out
