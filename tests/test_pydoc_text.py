"""The offline held-out text: Python's own documentation topics, split by topic, deterministically."""

import json

import pytest

from qlora_kit.data import pydoc_text
from qlora_kit.errors import DataError


def test_split_by_topic_deterministic_and_lossless(tmp_path):
    topics = pydoc_text.topics()
    held = [n for n in topics if pydoc_text.is_heldout(n)]
    assert 0.1 * len(topics) < len(held) < 0.35 * len(topics)  # ~20% of the topics
    paths = pydoc_text.write(tmp_path / "a", max_chars=800)
    again = pydoc_text.write(tmp_path / "b", max_chars=800)
    for side in ("train", "heldout"):
        assert paths[side].read_bytes() == again[side].read_bytes()
    pieces = {side: [json.loads(line)["text"] for line in paths[side].read_text().splitlines()] for side in paths}
    assert all(0 < len(t) <= 800 for ts in pieces.values() for t in ts)
    # nothing lost or reordered: the pieces of each side, word by word, are its topics' words in sorted order
    for side, names in (("heldout", sorted(held)), ("train", sorted(set(topics) - set(held)))):
        want = [w for n in names for w in topics[n].split()]
        assert [w for t in pieces[side] for w in t.split()] == want
    about = json.loads((tmp_path / "a" / "about.json").read_text())
    assert about["heldout_topics"] == sorted(held) and about["pieces"]["heldout"] == len(pieces["heldout"])


def test_pieces_cut_long_paragraphs_and_lines():
    text = "short para\n\n" + "x" * 25 + "\nline two\n\n" + "y " * 30
    out = pydoc_text.pieces(text, max_chars=20)
    assert all(len(p) <= 20 for p in out)
    assert "".join(out).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_builtin_names_resolve_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path))
    path = pydoc_text.resolve("pydoc-heldout")
    assert path.is_file() and str(path).startswith(str(tmp_path))
    assert pydoc_text.resolve(str(path)) == path  # a path as given
    with pytest.raises(DataError, match="not found"):
        pydoc_text.resolve(str(tmp_path / "missing.jsonl"))
