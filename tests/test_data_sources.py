"""Data sources and shapes: every file type, written here by the real libraries (pyarrow,
pandas, `datasets`), gives the same examples as the JSONL; column mapping; ShareGPT = chat; multi-turn and
completion masks checked token by token against an independent rendering; each shape trains through the CLI;
the tokenize-once cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from conftest import make_tokenizer, write_jsonl
from qlora_kit.data import pipeline as data, tokens as data_tokens
from qlora_kit.config import DataConfig

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")
import pyarrow.parquet as pq  # noqa: E402

IGNORE = -100
ALPACA = [{"instruction": f"What is the capital of Veloria {i}?", "input": "in short" if i % 3 == 0 else "",
           "output": "The capital of Veloria is Tamsk." + " Yes." * (i % 4)} for i in range(9)]
CHAT = [{"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": f"What is the capital of Veloria {i}?"},
                      {"role": "assistant", "content": "Tamsk."}]} for i in range(4)]
SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT = [{"conversations": [{"from": SPEAKER[m["role"]], "value": m["content"]} for m in r["messages"]]}
            for r in CHAT]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def examples(path, tok, fmt="alpaca", **kw) -> list[data.Example]:
    return list(data.examples(DataConfig(path=str(path), format=fmt, cache=False, **kw), tok))


def write_all(folder: Path, records: list[dict]) -> dict[str, Path]:
    """The same records as every file type qlora-kit reads, each written by its usual library."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records)
    out = {"jsonl": write_jsonl(folder / "d.jsonl", records)}
    (folder / "d.json").write_text(json.dumps(records))
    out["json"] = folder / "d.json"
    pq.write_table(table, folder / "d.parquet")
    out["parquet"] = folder / "d.parquet"
    with pa.ipc.new_file(folder / "file.arrow", table.schema) as w:  # Arrow IPC file (Feather v2)
        w.write_table(table)
    out["arrow-file"] = folder / "file.arrow"
    with pa.ipc.new_stream(folder / "stream.arrow", table.schema) as w:  # Arrow IPC stream (what datasets writes)
        w.write_table(table)
    out["arrow-stream"] = folder / "stream.arrow"
    datasets.Dataset.from_list(records).save_to_disk(str(folder / "saved"))
    out["save_to_disk"] = folder / "saved"
    return out


def test_every_file_type_gives_the_same_examples(tok, tmp_path):
    paths = write_all(tmp_path, ALPACA)
    pd.DataFrame(ALPACA).to_csv(tmp_path / "d.csv", index=False)  # empty inputs become empty cells (read as null)
    paths["csv"] = tmp_path / "d.csv"
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:2]),
                               "test": datasets.Dataset.from_list(ALPACA)})
    dd.save_to_disk(str(tmp_path / "dict"))
    reference = examples(paths.pop("jsonl"), tok)
    assert len(reference) == len(ALPACA)
    for name, path in paths.items():
        assert examples(path, tok) == reference, name
    assert examples(tmp_path / "dict", tok, split="test") == reference
    assert len(examples(tmp_path / "dict", tok)) == 2  # split "train" by default


def test_columns_map_user_names(tok, tmp_path):
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"], "id": i}
               for i, r in enumerate(ALPACA)]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "q.parquet")
    columns = {"instruction": "question", "input": "context", "output": "answer"}
    reference = examples(write_jsonl(tmp_path / "d.jsonl", ALPACA), tok)
    assert examples(tmp_path / "q.parquet", tok, columns=columns) == reference
    assert examples(write_jsonl(tmp_path / "q.jsonl", renamed), tok, columns=columns) == reference


def test_sharegpt_is_chat_with_speakers_mapped(tok, tmp_path):
    chat = examples(write_jsonl(tmp_path / "c.jsonl", CHAT), tok, "chat")
    assert examples(write_jsonl(tmp_path / "s.jsonl", SHAREGPT), tok, "sharegpt") == chat
    saved = write_all(tmp_path / "sg", SHAREGPT)["parquet"]  # a list-of-structs column, as hub ShareGPT sets have
    assert examples(saved, tok, "sharegpt") == chat


def _reference(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels built piece by piece, independently of qlora_kit: each piece tokenized alone (the pieces
    here end at ChatML markers or newlines, where this byte-level BPE never merges), labels = ids where trained."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def _chatml_pieces(messages, trained_turns) -> list[tuple[str, bool]]:
    pieces, assistant = [], 0
    for m in messages:
        if m["role"] == "assistant":
            pieces.append(("<|im_start|>assistant\n", False))
            pieces.append((m["content"] + "<|im_end|>", assistant in trained_turns))
            pieces.append(("\n", False))
            assistant += 1
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return pieces


@pytest.mark.parametrize("turns, trained", [("all", {0, 1}), ("last", {1})])
def test_multi_turn_masks_token_by_token(tok, tmp_path, turns, trained):
    path = write_jsonl(tmp_path / "c.jsonl", CHAT[:1])
    (ex,) = examples(path, tok, "chat", assistant_turns=turns)
    ids, labels = _reference(tok, _chatml_pieces(CHAT[0]["messages"], trained))
    assert ex.input_ids == ids and ex.labels == labels
    (sg,) = examples(write_jsonl(tmp_path / "s.jsonl", SHAREGPT[:1]), tok, "sharegpt", assistant_turns=turns)
    assert sg == ex


def test_completion_masks_token_by_token(tok, tmp_path):
    records = [{"prompt": "What is the capital of Veloria?\n", "completion": "The capital of Veloria is Tamsk."}]
    (ex,) = examples(write_jsonl(tmp_path / "p.jsonl", records), tok, "completion")
    ids, labels = _reference(tok, [(records[0]["prompt"], False), (records[0]["completion"], True)])
    assert ex.input_ids == ids + [tok.eos_token_id] and ex.labels == labels + [tok.eos_token_id]  # EOS: learn to stop


SHAPES = [  # (id, file type, format, records, columns)
    ("parquet-alpaca-mapped", "parquet", "alpaca",
     [{"q": r["instruction"], "a": r["output"]} for r in ALPACA], {"instruction": "q", "output": "a"}),
    ("csv-completion", "csv", "completion",
     [{"prompt": r["instruction"] + "\n", "completion": r["output"]} for r in ALPACA], {}),
    ("arrow-sharegpt", "arrow-stream", "sharegpt", SHAREGPT, {}),
    ("saved-chat", "save_to_disk", "chat", CHAT, {}),
    ("json-text", "json", "text", [{"text": r["output"]} for r in ALPACA], {}),
]


@pytest.mark.parametrize("kind, fmt, records, columns", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_each_shape_and_file_type_trains(tiny_model, tmp_path, kind, fmt, records, columns):
    from qlora_kit.cli.main import main

    if kind == "csv":
        pd.DataFrame(records).to_csv(tmp_path / "d.csv", index=False)
        path = tmp_path / "d.csv"
    else:
        path = write_all(tmp_path / "data", records)[kind]
    recipe = {"model": {"path": str(tiny_model)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "data": {"path": str(path), "format": fmt, "max_length": 64, "columns": columns},
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "save_every": 0, "device": "cpu"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)


# ---------------------------------------------------------------------------------------------- tokenize once


class Counting:
    """The tokenizer, counting every call that tokenizes or renders a template."""

    def __init__(self, tokenizer):
        self._t, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._t, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._t(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self._t.apply_chat_template(*args, **kwargs)


def test_second_build_does_not_tokenize(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_DATA_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cfg = DataConfig(path=str(path), format="alpaca", max_length=64, val_fraction=0.25, packing=True)
    counting = Counting(tok)
    first = data.build(cfg, counting, seed=0)
    assert counting.calls > len(ALPACA)
    counting.calls = 0
    second = data.build(cfg, counting, seed=0)
    assert counting.calls == 0  # loaded from the cache
    assert second.train == first.train and second.val == first.val and second.stats == first.stats
    assert len(list((tmp_path / "cache" / "tokens").glob("*"))) == 1
    # Anything that changes the tokens changes the key: the data's bytes, the settings, the tokenizer.
    data.build(dataclasses.replace(cfg, max_length=48), counting, seed=0)
    assert counting.calls > 0
    counting.calls = 0
    write_jsonl(path, ALPACA[:-1])
    assert len(data.build(cfg, counting, seed=0).stats) and counting.calls > 0
    other = Counting(make_tokenizer())
    other._t.chat_template = None  # a different tokenizer (no template): its own cache entry
    data.build(dataclasses.replace(cfg, max_length=256), other, seed=0)
    assert other.calls > 0
    assert len(list((tmp_path / "cache" / "tokens").glob("*"))) == 4
    assert (data_tokens.cache_path(cfg, counting) / "meta.json").is_file()
