"""Smaller holes in reading user input: a BOM before JSONL, CSV cells that look like numbers, what an empty, ragged
or Latin-1 CSV is told, non-finite temperatures, eval's --format, --out '', --plot without matplotlib, and a huge
record tokenized only as far as max_length needs."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import FACTS, make_tokenizer, write_jsonl
from qlora_kit.cli.main import main
from qlora_kit.config import DataConfig
from qlora_kit.data import pipeline as data
from qlora_kit.data import sources, tokens
from qlora_kit.errors import DataError


def refused(capsys, argv: list[str], *words: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, err[-2000:])
    assert "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def test_bom_before_jsonl_is_read_like_the_bom_csv(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in FACTS[:3]).encode())
    data.check(DataConfig(path=str(path), format="alpaca"))
    tok = tokens.tokenize_all(DataConfig(path=str(path), format="alpaca"), make_tokenizer())
    assert tok.stats["records"] == 3
    listed = tmp_path / "bom.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(FACTS[:3]).encode())
    data.check(DataConfig(path=str(listed), format="alpaca"))


def test_csv_cells_that_look_like_numbers_are_text(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "n.csv"
    path.write_text("instruction,input,output\nWhat is six times seven?,,42\nAnd NA?,,NA\nPi?,x,3.14\n")
    cfg = DataConfig(path=str(path), format="alpaca")
    data.check(cfg)
    rows = [r for _, r in sources.read(cfg)]
    assert [r["output"] for r in rows] == ["42", "NA", "3.14"]
    assert [r["input"] for r in rows] == [None, None, "x"]  # an empty cell is still null (absent)


@pytest.mark.parametrize("name,content,words", [
    ("empty.csv", b"", ["is empty", "header row"]),
    ("ragged.csv", b"instruction,output\na,b\nc,d,e,f\n", ["line 3 has 4 fields, the header 2"]),
    ("latin1.csv", "instruction,output\ncaf\u00e9?,cr\u00e8me\n".encode("latin-1"), ["not UTF-8", "as UTF-8"]),
])
def test_csv_errors_say_what_is_wrong(tmp_path, name, content, words):
    pytest.importorskip("datasets")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        data.check(DataConfig(path=str(path), format="alpaca"))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "DatasetGenerationError" not in str(e.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_generate_refuses_non_finite_temperature(tiny_model, capsys, value):
    refused(capsys, ["generate", str(tiny_model), "--prompt", "hi", "--temperature", value], "--temperature")


def test_eval_reads_every_format_train_reads(tiny_model, tmp_path, capsys):
    convs = [{"conversations": [{"from": "human", "value": f"Capital of Veloria {i}?"},
                                {"from": "gpt", "value": "Tamsk."}]} for i in range(4)]
    path = write_jsonl(tmp_path / "sg.jsonl", convs)
    assert main(["eval", str(tiny_model), "--data", str(path), "--format", "sharegpt", "--json",
                 "--no-progress"]) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "sharegpt" and res["examples"] == 4 and res["masked"]
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Capital?", "completion": " Tamsk."}] * 2)
    assert main(["eval", str(tiny_model), "--data", str(comp), "--format", "completion", "--json",
                 "--no-progress"]) == 0


def test_empty_out_is_refused(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"path": str(tiny_model)}, "data": {"path": str(tiny_data)},
                                  "train": {"steps": 1, "device": "cpu"}}))
    refused(capsys, ["train", str(recipe), "--out", ""], "--out", "is empty")
    refused(capsys, ["train", str(recipe), "--set", "output.dir="], "output.dir", "not empty")
    refused(capsys, ["export", str(tmp_path), "--format", "merged", "--out", " "], "is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_plot_without_matplotlib_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from qlora_kit.analysis import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(Exception, match="needs matplotlib"):
        plots.write_plots(object(), tmp_path / "plots")
    assert not (tmp_path / "plots").exists()
    refused(capsys, ["analyze", str(tmp_path), "--plot", str(tmp_path / "p2")], "needs matplotlib")
    assert not (tmp_path / "p2").exists()


def test_a_huge_record_is_tokenized_only_as_far_as_max_length_needs(tmp_path, monkeypatch):
    tok = make_tokenizer()
    text = "The capital of Veloria is Tamsk. " * 60_000  # ~2 MB
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": text}, {"text": "hello world"}])
    seen = []
    real = type(tok).__call__

    def spy(self, t, *a, **k):
        seen.append(len(t) if isinstance(t, str) else 0)
        return real(self, t, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", spy)
    out = tokens.tokenize_all(DataConfig(path=str(path), format="text", max_length=64), tok)
    monkeypatch.undo()
    assert max(seen) < len(text) // 10
    reference = tok(text, add_special_tokens=False)["input_ids"][:64]  # the whole record, as before
    assert out.ids[: out.offsets[1]].tolist() == reference and out.stats["truncated"] == 1
