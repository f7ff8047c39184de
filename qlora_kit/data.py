"""Data: records -> prompt or chat template -> tokens -> label mask -> truncation -> split -> (packing) -> batches.

Formats: text {"text"} (loss on all tokens, EOS appended); alpaca {"instruction", "input"?, "output"} (loss on the
response and its end-of-turn/EOS); chat {"messages": [{"role", "content"}]} (loss on every assistant turn).

Label mask, one method for every format: an example is rendered to ONE string plus the character spans that take
loss; the string is tokenized once and a token takes loss iff its offset range overlaps a span. Masking "len(tokenize
(prompt))" tokens breaks when a tokenizer merges across the prompt/response boundary; tokenizing the pieces apart and
concatenating makes sequences the tokenizer never makes on whole text (SentencePiece adds a "▁" at each piece's
start). Offsets keep the natural tokenization; a token straddling the boundary takes loss (the model must emit it) and
is counted in stats["boundary_merges"]. Only tokenizers without offsets (pure-Python ones) go piece by piece.

Chat templates: assistant turn i's span runs from the end of render(turns < i, add_generation_prompt=True) to the end
of render(turns <= i), minus trailing whitespace (ChatML's "\n" after <|im_end|>: the model stops at the marker).
Template text is tokenized with add_special_tokens=False, as `apply_chat_template` does: a template writes BOS itself
when its model wants one, so BOS is never doubled.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig
from .errors import DataError
from .terms import IGNORE

ALPACA_HEAD = "Below is an instruction that describes a task. "
ALPACA_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
)
ALPACA_TAIL = "Write a response that appropriately completes the request."
_FORMAT_HELP = {
    "text": '{"text": "..."}',
    "alpaca": '{"instruction": "...", "input": "..." (optional), "output": "..."}',
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
}
_REQUIRED = {"text": ("text",), "alpaca": ("instruction", "output"), "chat": ("messages",)}
_STRINGS = {"text": ("text",), "alpaca": ("instruction", "input", "output"), "chat": ()}
_ROLES = ("system", "user", "assistant")
_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no UTF-8 encoding exists

Record = dict[str, Any]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss is taken; not shifted (HF convention: the loss shifts)


@dataclass(frozen=True)
class Dataset:
    train: list[Example]
    val: list[Example]
    stats: dict[str, int]  # records, truncated, dropped, boundary_merges, train/val_examples, train/val_tokens, ...


def _read(path: str | Path, fmt: str) -> list[tuple[str, Record]]:
    """[(place, record)]; place is "FILE:LINE" for .jsonl and "FILE item N" for a .json list (1-based)."""
    path = Path(path)
    if fmt not in _FORMAT_HELP:
        raise DataError(f"unknown data format {fmt!r}; set data.format to one of {', '.join(_FORMAT_HELP)}.")
    if not path.is_file():
        raise DataError(f"data file not found: {path}. Set data.path to a .jsonl or .json file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8.") from None
    example = f"one {fmt} record a line, like {_FORMAT_HELP[fmt]}"
    found: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        try:
            items = json.loads(text) if text.strip() else []
        except (ValueError, RecursionError) as e:
            line = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise DataError(f"{path}{line}: invalid JSON ({_why(e)}); fix it there.") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects; or use .jsonl with {example}.")
        found = [(f"{path} item {i}", item) for i, item in enumerate(items, 1)]
    else:  # JSON Lines (whatever the suffix)
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
            if line.strip():  # blank lines are fine (a trailing newline, grouping)
                try:
                    found.append((f"{path}:{lineno}", json.loads(line)))
                except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit int, deep nesting
                    raise DataError(f"{path}:{lineno}: invalid JSON ({_why(e)}); write {example}.") from None
    if not found:
        raise DataError(f"{path} holds no records; add at least {example}.")
    for place, record in found:
        _validate(record, fmt, place)
    return found


def _why(e: Exception) -> str:
    return f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e) or type(e).__name__


def _validate(record: Any, fmt: str, place: str) -> None:
    def bad(what: str) -> DataError:
        return DataError(f"{place}: {what}; the {fmt} format needs {_FORMAT_HELP[fmt]}. Fix the record or data.format.")

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, got {type(record).__name__}")
    for key in _REQUIRED[fmt]:
        if key not in record:
            raise bad(f"missing field '{key}' (found: {', '.join(record) or 'no fields'})")
    for key in _STRINGS[fmt]:
        if key in record and not isinstance(record[key], str):
            raise bad(f"field '{key}' must be a string, got {type(record[key]).__name__}")
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad("field 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise bad(f"messages[{i}] must have 'role' in {list(_ROLES)} and a string 'content', got {m!r:.80}")
        if not any(m["role"] == "assistant" for m in messages):
            raise bad("the conversation has no assistant message to learn from")
    texts = [record[k] for k in _STRINGS[fmt] if k in record] + ([m["content"] for m in record["messages"]]
                                                                 if fmt == "chat" else [])
    if any(_SURROGATE.search(t) for t in texts):  # JSON allows "\\ud800"; tokenizers raise a TypeError on it
        raise bad("a string holds a lone surrogate escape such as \\ud800, which is not valid unicode text")


def load_records(path: str | Path, fmt: str) -> list[Record]:
    """Read and validate a .jsonl / .json data file; DataError names the file and 1-based line."""
    return [record for _, record in _read(path, fmt)]


def _has_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _chat(tokenizer: Any, messages: Messages, gen: bool, place: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # a template is code shipped with the model: any failure means it rejects this record
        raise DataError(f"{place}: the tokenizer's chat template rejected this conversation: {e}") from None


def _alpaca_messages(record: Record, system_prompt: str | None) -> Messages:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return system + [{"role": "user", "content": user}]


def _alpaca_plain(record: Record, system_prompt: str | None) -> str:
    """The classic Stanford Alpaca prompt; a system_prompt, if given, replaces the preamble (it plays that role)."""
    extra = f"\n\n### Input:\n{record['input']}" if record.get("input") else ""
    head = system_prompt if system_prompt is not None else (ALPACA_HEAD_INPUT if extra else ALPACA_HEAD) + ALPACA_TAIL
    return f"{head}\n\n### Instruction:\n{record['instruction']}{extra}\n\n### Response:\n"


def _with_system(messages: Messages, system_prompt: str | None) -> Messages:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages  # a record's own system message wins over the recipe's default
    return [{"role": "system", "content": system_prompt}] + messages


def render_prompt(record_or_question: str | Record, tokenizer: Any, fmt: str, system_prompt: str | None = None) -> str:
    """The text the model sees before its answer, exactly as in training (for generation after training).

    A string is a question (alpaca: the instruction; chat: one user message); for a chat record, the prompt is the
    conversation before its last assistant turn. `encode_prompt` tokenizes it the way training does."""
    q = record_or_question
    if fmt == "text":
        return q if isinstance(q, str) else q["text"]
    if fmt == "alpaca":
        record = {"instruction": q} if isinstance(q, str) else q
        if _has_template(tokenizer):
            return _chat(tokenizer, _alpaca_messages(record, system_prompt), True, "prompt")
        return _alpaca_plain(record, system_prompt)
    if fmt != "chat":
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(_FORMAT_HELP)}.")
    if not _has_template(tokenizer):
        raise DataError("data.format is chat but the tokenizer has no chat template; use format alpaca or text.")
    messages = [{"role": "user", "content": q}] if isinstance(q, str) else list(q["messages"])
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _chat(tokenizer, _with_system(messages, system_prompt), True, "prompt")


def _templated(tokenizer: Any, fmt: str) -> bool:
    return fmt == "chat" or (fmt == "alpaca" and _has_template(tokenizer))


def encode_prompt(
    record_or_question: str | Record, tokenizer: Any, fmt: str, system_prompt: str | None = None
) -> list[int]:
    """`render_prompt` tokenized as `build` tokenizes it (with BOS exactly where training has one)."""
    text = render_prompt(record_or_question, tokenizer, fmt, system_prompt)
    return _bos(tokenizer, text, _templated(tokenizer, fmt)) + tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_token_id(tokenizer: Any) -> int:
    """The id `collate` pads with: the pad token, else EOS (pad positions are masked, so the value is moot)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token, so batches cannot be padded.")
    return int(pad)


def _bos(tokenizer: Any, text: str, templated: bool) -> list[int]:
    """[BOS] where the tokenizer normally prepends one (Llama-style) and the text does not already start with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if templated or bos is None or (tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
        return []
    adds = tokenizer("a")["input_ids"][:1] == [bos] != tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    return [bos] if adds else []


def _render(record: Record, tokenizer: Any, cfg: DataConfig, place: str) -> tuple[str, list[tuple[int, int]]]:
    """-> (full text, character spans that take loss). Plain (template-less) formats get EOS appended as an id."""
    if cfg.format == "text":
        return record["text"], [(0, len(record["text"]))]
    if cfg.format == "alpaca" and not _has_template(tokenizer):
        prompt = _alpaca_plain(record, cfg.system_prompt)
        return prompt + record["output"], [(len(prompt), len(prompt) + len(record["output"]))]
    if cfg.format == "alpaca":
        messages = _alpaca_messages(record, cfg.system_prompt) + [{"role": "assistant", "content": record["output"]}]
    elif not _has_template(tokenizer):
        raise DataError(f"{place}: data.format is chat but the tokenizer has no chat template; use alpaca or text.")
    else:
        messages = _with_system(record["messages"], cfg.system_prompt)
    full = _chat(tokenizer, messages, False, place)
    spans = []
    for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
        prompt = _chat(tokenizer, messages[:i], True, place)
        turn = _chat(tokenizer, messages[: i + 1], False, place)
        if not (full.startswith(turn) and turn.startswith(prompt)):
            raise DataError(
                f"{place}: the chat template renders turn {i} differently once later turns follow, so the loss "
                "span of that turn cannot be found. Split the conversation into one record per assistant turn."
            )
        spans.append((len(prompt), len(prompt) + len(turn[len(prompt) :].rstrip())))
    return full, spans


def _tokenize(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], templated: bool, train_all: bool
) -> tuple[list[int], list[int], bool]:
    """-> (input_ids, labels, whether a token straddles a span boundary)."""
    ids = _bos(tokenizer, text, templated)
    keep = [train_all] * len(ids)
    merged = False
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
    if not templated and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # so the model learns to stop; an id, not text, which every tokenizer keeps
        keep.append(True)
    return ids, [t if k else IGNORE for t, k in zip(ids, keep)], merged


def _trainable(ex: Example) -> int:
    return sum(1 for x in ex.labels[1:] if x != IGNORE)  # labels[0] is never a target: nothing precedes it


def _pack(examples: list[Example], max_length: int, rng: random.Random) -> list[Example]:
    """Greedily fill rows of <= max_length tokens with examples in a seeded order.

    Trade-off: far fewer pad tokens, but attention is plain causal over the row, so an example also attends to the
    examples before it (no block-diagonal mask, no position-id reset). Each packed example's first label becomes
    IGNORE, so exactly the tokens that take loss unpacked take loss packed (never "predict doc 2 from doc 1")."""
    order = list(examples)
    rng.shuffle(order)
    rows: list[Example] = []
    ids, labels = [], []  # the row being filled
    for ex in order:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            rows.append(Example(ids, labels))
            ids, labels = [], []
        ids.extend(ex.input_ids)
        labels.extend([IGNORE] + ex.labels[1:])
    if ids:
        rows.append(Example(ids, labels))
    return rows


def build(cfg: DataConfig, tokenizer: Any, seed: int) -> Dataset:
    """Load, render, tokenize, mask, truncate; split by record (seeded); pack the training split if asked.

    Validation examples are never packed: validation loss is then measured per example, without cross-talk."""
    found = _read(cfg.path, cfg.format)
    order = list(range(len(found)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if cfg.val_fraction > 0 and len(found) >= 2:
        n_val = min(len(found) - 1, max(1, round(cfg.val_fraction * len(found))))
    val_idx = set(order[:n_val])
    train_all = cfg.train_on_prompt or cfg.format == "text"  # text has no prompt (this also labels an added BOS)
    templated = _templated(tokenizer, cfg.format)

    stats = {"records": len(found), "truncated": 0, "dropped": 0, "boundary_merges": 0}
    train: list[Example] = []
    val: list[Example] = []
    longest_prompt = 0  # tokens before the first label, for the error message
    for i, (place, record) in enumerate(found):
        text, spans = _render(record, tokenizer, cfg, place)
        ids, labels, merged = _tokenize(tokenizer, text, spans, templated, train_all)
        stats["boundary_merges"] += merged
        longest_prompt = max(longest_prompt, next((j for j, x in enumerate(labels) if x != IGNORE), len(labels)))
        if len(ids) > cfg.max_length:
            stats["truncated"] += 1
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if _trainable(ex := Example(ids, labels)) == 0:
            stats["dropped"] += 1  # nothing left to learn from (the prompt alone fills max_length)
            continue
        (val if i in val_idx else train).append(ex)
    if not train:
        raise DataError(
            f"{cfg.path}: no example has a trainable token left: every example is longer than data.max_length="
            f"{cfg.max_length} before its response starts (the longest prompt has {longest_prompt} tokens). Raise "
            f"data.max_length, e.g. --set data.max_length={max(2 * cfg.max_length, longest_prompt + 64)}."
        )
    if cfg.packing:
        train = _pack(train, cfg.max_length, random.Random(seed + 1))
    stats.update(train_examples=len(train), val_examples=len(val), val_tokens=sum(len(e.input_ids) for e in val))
    stats.update(train_tokens=sum(len(e.input_ids) for e in train), train_label_tokens=sum(map(_trainable, train)))
    return Dataset(train=train, val=val, stats=stats)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row -> input_ids, attention_mask, labels: each (B, T) int64; labels IGNORE on pad."""
    shape = (len(examples), max(len(e.input_ids) for e in examples))  # (B, T)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchStream:
    """Infinite, deterministic, resumable batches over `examples`.

    Epoch e visits the examples in the order randperm(n) drawn from a generator seeded from (seed, e), so a position
    is just (epoch, index) and resuming needs no saved permutation. A batch that runs past an epoch's end is filled
    from the next epoch: every batch has exactly batch_size rows (the same loss scale every step)."""

    epoch: int  # position: the epoch, and the index into that epoch's order of the next example
    index: int
    _order: list[int]

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int) -> None:
        if not examples:
            raise DataError("there are no training examples to iterate over; check data.path and data.max_length.")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.load_state_dict({"epoch": 0, "index": 0})

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked: list[Example] = []
        while len(picked) < self.batch_size:
            if self.index == len(self.examples):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            picked.append(self.examples[self._order[self.index]])
            self.index += 1
        return collate(picked, self.pad_id)

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
