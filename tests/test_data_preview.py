"""`qlora-kit data RECIPE`: the examples as trained, loss tokens marked, counts, lengths and packing, checked against
the tokenizer's own template rendering of each record (not against the pipeline it reuses)."""

from __future__ import annotations

import json

import yaml

from conftest import make_tokenizer, write_jsonl

# varying lengths: short, long (truncated at max_length 40), and one whose prompt alone fills max_length (dropped)
RECORDS = [{"instruction": "hello", "output": "hello world"},
           {"instruction": "What is the capital of Veloria?", "output": "The capital of Veloria is Tamsk. " * 4},
           {"instruction": "Paris is in France. " * 12, "output": "Paris."},
           {"instruction": "A quick brown fox?", "output": "jumps over the lazy dog."},
           {"instruction": "Answer the question briefly.", "output": "hello"}]
MAX = 40


def _recipe(tmp_path, model: str, data, **data_keys) -> str:
    raw = {"model": {"path": model}, "data": {"path": str(data), "format": "alpaca", "max_length": MAX,
                                              "val_fraction": 0.0, **data_keys},
           "train": {"device": "cpu"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _reference(record: dict) -> tuple[int, int]:
    """(tokens of the whole rendered record, tokens of its prompt) from the template itself."""
    tok = make_tokenizer()
    user = [{"role": "user", "content": record["instruction"]}]
    whole = tok.apply_chat_template(user + [{"role": "assistant", "content": record["output"]}], tokenize=True,
                                    return_dict=True)["input_ids"]
    prompt = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    return len(whole), len(prompt)


def test_data_preview_counts_marks_and_packing(tmp_path, tiny_model, capsys):
    from qlora_kit.cli.main import main

    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    assert main(["data", _recipe(tmp_path, str(tiny_model), data), "--json", "--examples", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    sizes = [_reference(r) for r in RECORDS]
    assert report["records"] == len(RECORDS)
    assert report["truncated"] == sum(n > MAX for n, _ in sizes) >= 2
    assert report["dropped"] == sum(p >= MAX for _, p in sizes) == 1
    kept = [min(n, MAX) for n, p in sizes if p < MAX]
    assert report["examples"] == len(kept) and report["tokens"] == sum(kept)
    assert sum(c for _, _, c in report["histogram"]) == len(kept)
    assert report["lengths"] == {"min": min(kept), "median": sorted(kept)[len(kept) // 2], "max": max(kept)}
    # shown examples: record numbers skip the dropped one; the marked text is exactly the answer + end of turn
    assert [ex["record"] for ex in report["shown"]] == [1, 2, 4, 5]
    first = report["shown"][0]
    assert "".join(t for t, loss in first["segments"] if loss) == "hello world<|im_end|>"
    assert "".join(t for t, _ in first["segments"]).startswith("<|im_start|>user\nhello<|im_end|>")
    assert first["loss_tokens"] == sum(1 for _ in make_tokenizer()("hello world<|im_end|>")["input_ids"])
    p = report["packing"]
    assert not p["on"] and p["rows"] == len(kept)
    assert abs(p["fill"] - sum(kept) / (len(kept) * MAX)) < 1e-9
    assert min(a + b for i, a in enumerate(kept) for b in kept[i + 1:]) > MAX  # no two fit in one row
    assert p["if_packed_rows"] == len(kept) and p["if_packed_fill"] == p["fill"]


def test_data_preview_packed_reports_the_rows_training_uses(tmp_path, tiny_model, capsys):
    from qlora_kit.cli.main import main
    from qlora_kit.config import load_recipe
    from qlora_kit.data import pipeline
    from qlora_kit.model.tokenizer import load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 3)
    recipe = _recipe(tmp_path, str(tiny_model), data, packing=True, max_length=4 * MAX)
    assert main(["data", recipe, "--no-color"]) == 0
    text = capsys.readouterr().out
    cfg = load_recipe(recipe)
    ds = pipeline.build(cfg.data, load_tokenizer(tiny_model), cfg.train.seed)  # what train builds
    assert len(ds.train) < 12  # rows hold several examples
    fill = sum(ds.train.lengths()) / (len(ds.train) * 4 * MAX)
    assert f"packing: 12 examples in {len(ds.train)} rows of {4 * MAX} tokens, {fill:.1%} of the row" in text
    assert "\u27e6hello world<|im_end|>\u27e7" in text  # the loss tokens, marked
    assert "3 dropped" in text and "15 records -> 12 examples" in text
