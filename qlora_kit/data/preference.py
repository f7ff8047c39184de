"""Preference records: validated, rendered as SFT renders them, grouped into units, batched as one concatenated batch.

Shapes (`data.format: preference`):
  paired    {"prompt", "chosen", "rejected"}      strings (the prompt rendered as alpaca renders an instruction: the
                                                  chat template when the tokenizer has one, else the Alpaca prompt),
                                                  or chosen/rejected as message lists ending in the assistant turn
                                                  (prompt then a string user turn, a message list, or absent: the
                                                  conversation before the last turn, which must be the same in both)
  unpaired  {"prompt", "completion", "label"}     KTO only; label true (desirable) or false (undesirable)
Each answer becomes one SFT record (alpaca or chat with assistant_turns last), so prompt tokens take no loss and the
answer's tokens (with its end-of-turn / EOS) do, exactly as in SFT. data_tokens stores both answers of a pair as two
consecutive examples of the same record, with Tokenized.roles CHOSEN / REJECTED.

A batch of U units has 2U rows, unit-major, so that splitting rows between ranks keeps units whole:
  paired objectives   rows 2i, 2i+1 = chosen, rejected of pair i
  kto                 row 2i = completion i, row 2i+1 = prompt i with the completion of unit i's fixed partner
                      (`kl_partners`: the nearest earlier unit of another record, in the split's order): the
                      mismatched pair whose log-ratio estimates the KL reference point z0 (KTO paper, 4.1). The
                      partner belongs to the unit, not to the batch, so the step's mismatched pairs (and z0) are the
                      same however its units are split into micro-batches and ranks
plus `desirable` (2U,) int64: 1 where unit i's answer is desirable (kto; paired units: 1), and `example` (2U,)
int64: each row's Tokenized index (-1 for kto's mismatched rows), by which precomputed reference log-probs are found.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import formats as data_formats
from ..config import DataConfig
from ..errors import DataError
from .example import Example
from ..terms import IGNORE

CHOSEN, REJECTED = 1, 2  # Tokenized.roles (0: an SFT example); for kto: desirable, undesirable
HELP = ('{"prompt": "...", "chosen": "...", "rejected": "..."} (chosen/rejected may be message lists ending in the '
        'assistant turn), or for train.objective kto {"prompt": "...", "completion": "...", "label": true|false}')
FIELDS = ("prompt", "chosen", "rejected", "completion", "label")
Record = dict[str, Any]


def _bad(place: str, what: str) -> DataError:
    return DataError(f"{place}: {what}; the preference format needs {HELP}. Fix the record, map your columns with "
                     "data.columns, or set data.format.")


def _answer(prompt: Any, answer: Any, place: str, name: str) -> Record:
    """One side (prompt + one answer) as a canonical SFT record: alpaca for strings, chat for message lists."""
    if isinstance(prompt, str) and isinstance(answer, str):
        return data_formats.validate({"instruction": prompt, "output": answer}, "alpaca", f"{place} ({name})")
    if not isinstance(answer, (str, list)):
        raise _bad(place, f"field '{name}' must be a string or a list of messages, got {type(answer).__name__}")
    prefix = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
    turns = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
    record = data_formats.validate({"messages": prefix + turns}, "chat", f"{place} ({name})")
    if record["messages"][-1]["role"] != "assistant":
        raise _bad(place, f"'{name}' must end with the assistant's message (the answer that is judged)")
    return record


def validate(record: Any, place: str) -> Record:
    """-> {"chosen": sft record, "rejected": sft record} or {"completion": sft record, "label": bool}, each sft record
    canonical alpaca ({"instruction", "output"}) or chat ({"messages"})."""
    if not isinstance(record, dict):
        raise _bad(place, f"expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise _bad(place, f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if "completion" in record or "label" in record:
        for key in ("prompt", "completion", "label"):
            if record.get(key) is None:
                raise _bad(place, f"an unpaired (kto) record is missing field '{key}'")
        if not isinstance(record["label"], bool):
            raise _bad(place, f"field 'label' must be true or false, got {record['label']!r:.40}")
        return {"completion": _answer(prompt, record["completion"], place, "completion"), "label": record["label"]}
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise _bad(place, f"missing field '{key}' (found: {', '.join(map(str, record)) or 'no fields'})")
    chosen, rejected = record["chosen"], record["rejected"]
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise _bad(place, "missing field 'prompt' (only message-list answers carry their own prompt)")
        if chosen[:-1] != rejected[:-1]:
            raise _bad(place, "chosen and rejected conversations differ before their last message; they must share "
                              "the prompt and differ only in the final assistant turn")
    if chosen == rejected:
        raise _bad(place, "chosen and rejected are identical, so the pair prefers nothing")
    return {"chosen": _answer(prompt, chosen, place, "chosen"), "rejected": _answer(prompt, rejected, place,
                                                                                      "rejected")}


def pieces(record: Record, tokenizer: Any, cfg: DataConfig, place: str
           ) -> list[tuple[int, str, list[tuple[int, int]], bool]]:
    """A validated record -> [(role, text, loss spans, templated)]: two for a pair, one for an unpaired record."""
    if "label" in record:
        sides = [(CHOSEN if record["label"] else REJECTED, record["completion"])]
    else:
        sides = [(CHOSEN, record["chosen"]), (REJECTED, record["rejected"])]
    out = []
    for role, sft in sides:
        fmt = "chat" if "messages" in sft else "alpaca"
        text, spans = data_formats.render(sft, tokenizer, dataclasses.replace(cfg, format=fmt, assistant_turns="last"),
                                          place)
        out.append((role, text, spans, data_formats.templated(tokenizer, fmt)))
    return out


@dataclass(frozen=True)
class Unit:
    """What one draw of the batch stream returns: a pair (chosen, rejected), or one kto example."""

    examples: tuple[Example, ...]
    desirable: bool = True
    ids: tuple[int, ...] = ()  # the examples' Tokenized indices (precomputed reference log-probs are kept by them)
    kl: Example | None = None  # kto: the partner unit's example, whose answer follows this prompt in the KL row


def kl_partners(records: list[int]) -> list[int | None]:
    """kto units (by their record, in the split's order) -> each unit's partner: the nearest earlier unit,
    cyclically, whose record differs (a pair record gives two units with one prompt: the one before may share it);
    None when every unit comes from one record (no mismatched pair exists)."""
    n, out = len(records), []
    for i, r in enumerate(records):
        out.append(next(((i - k) % n for k in range(1, n) if records[(i - k) % n] != r), None))
    return out


def units(roles: list[int], records: list[int], index: list[int], paired: bool, where: str) -> list[tuple[int, ...]]:
    """Example indices (of Tokenized, restricted to `index`, in order) grouped into units: consecutive examples of one
    record form a pair. paired (dpo, ipo, orpo, simpo): every unit a (chosen, rejected) pair; kto: every example
    its own unit (a pair gives a desirable and an undesirable one)."""
    out: list[tuple[int, ...]] = []
    i = 0
    while i < len(index):
        a = index[i]
        if i + 1 < len(index) and records[index[i + 1]] == records[a]:
            group, i = (a, index[i + 1]), i + 2
        else:
            group, i = (a,), i + 1
        if not paired:
            out += [(g,) for g in group]
        elif len(group) == 2 and roles[group[0]] == CHOSEN and roles[group[1]] == REJECTED:
            out.append(group)
        else:
            raise DataError(f"{where}: record {records[a] + 1} is an unpaired {{prompt, completion, label}} record; "
                            "only train.objective kto learns from those. Give it chosen and rejected answers, or set "
                            "train.objective=kto.")
    return out


def split(example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer starts at the first token that takes loss."""
    k = next(i for i, y in enumerate(example.labels) if y != IGNORE)
    return example.input_ids[:k], example.input_ids[k:]


def collate(picked: Sequence[Unit], pad_id: int) -> dict[str, torch.Tensor]:
    """Units -> one batch of 2U rows (module docstring): input_ids, attention_mask, labels (2U, T) int64, right
    padded, labels IGNORE on prompt and padding; desirable (2U,) int64."""
    rows: list[tuple[list[int], list[int]]] = []
    desirable: list[int] = []
    example: list[int] = []
    for u in picked:
        example += list(u.ids) if len(u.ids) == 2 else [*u.ids[:1], -1] if u.ids else [-1, -1]
        if len(u.examples) == 2:
            rows += [(e.input_ids, e.labels) for e in u.examples]
        else:  # kto: the example, then its prompt with its partner's answer
            e = u.examples[0]
            if u.kl is None:
                raise DataError("kto: every answer comes from one record, so there is no mismatched (prompt, answer) "
                                "pair to estimate the reference point z0 from; give answers to at least two prompts")
            prompt, _ = split(e)
            _, other = split(u.kl)
            rows += [(e.input_ids, e.labels), (prompt + other, [IGNORE] * len(prompt) + other)]
        desirable += [int(u.desirable), int(u.desirable)]
    shape = (len(rows), max(len(ids) for ids, _ in rows))
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for r, (x, y) in enumerate(rows):
        ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "desirable": torch.tensor(desirable, dtype=torch.long), "example": torch.tensor(example, dtype=torch.long)}
