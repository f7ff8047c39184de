"""Real held-out English text that exists offline: the Python documentation shipped with the interpreter.

`pydoc_data.topics.topics` (about 79 topics, ~465 KB of the Language Reference as plain text, PSF licence) is part
of every CPython install; `help("assert")` prints from it. It is split deterministically BY TOPIC, so held-out text
shares no section with training text: a topic is held out when the first byte of sha256(name) is below
256 * heldout_fraction (stable when a Python release adds or drops topics; the content differs slightly between
Python versions, so the files record the version).

Each topic becomes pieces of at most `max_chars` characters cut at paragraph breaks (a paragraph longer than that
is cut at a line break, then anywhere), written as a JSONL data set of format `text`: {"text": piece}.

Built-in names for `qlora-kit eval --data`: `pydoc-train` and `pydoc-heldout` (written once into the cache).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ..atomic import write_text

BUILTIN = {"pydoc-train": "train", "pydoc-heldout": "heldout"}
HELDOUT_FRACTION = 0.2
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow")
MAX_CHARS = 1200  # ~280 tokens of this text for a Llama-style BPE: one piece fills a 256-token example


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as t  # ships with CPython; never downloaded

    return dict(t)


def is_heldout(name: str, fraction: float = HELDOUT_FRACTION) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] < 256 * fraction


def pieces(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Consecutive pieces of `text`, each <= max_chars, cut at blank lines where possible, else at line breaks,
    else hard. Whitespace at piece edges is dropped; nothing else is lost or reordered."""
    parts = [part for para in (p.strip("\n") for p in text.split("\n\n")) if para.strip()
             for part in ([para] if len(para) <= max_chars else _cut(para, max_chars))]
    return _greedy(parts, "\n\n", max_chars)


def _cut(para: str, max_chars: int) -> list[str]:
    """A paragraph longer than max_chars: its lines (a line longer than max_chars cut hard), joined greedily."""
    lines = []
    for line in para.split("\n"):
        while len(line) > max_chars:  # one enormous line: cut hard
            lines.append(line[:max_chars])
            line = line[max_chars:]
        lines.append(line)
    return _greedy(lines, "\n", max_chars)


def _greedy(parts: list[str], sep: str, max_chars: int) -> list[str]:
    """Join consecutive `parts` (each <= max_chars) with `sep` into as few pieces of <= max_chars as greedily fit."""
    out, current = [], ""
    for part in parts:
        joined = f"{current}{sep}{part}" if current else part
        if len(joined) <= max_chars:
            current = joined
        else:
            out.append(current)
            current = part
    return out + ([current] if current else [])


def split(max_chars: int = MAX_CHARS, fraction: float = HELDOUT_FRACTION) -> dict[str, list[str]]:
    """{"train": [...], "heldout": [...]} pieces, topics in sorted order."""
    out: dict[str, list[str]] = {"train": [], "heldout": []}
    for name, text in sorted(topics().items()):
        out["heldout" if is_heldout(name, fraction) else "train"] += pieces(text, max_chars)
    return out


def write(folder: str | Path, max_chars: int = MAX_CHARS, fraction: float = HELDOUT_FRACTION) -> dict[str, Path]:
    """Write train.jsonl and heldout.jsonl (and about.json: Python version, topics per side) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = split(max_chars, fraction)
    paths = {}
    for side, texts in parts.items():
        paths[side] = folder / f"{side}.jsonl"
        write_text(paths[side], "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    about = {"source": "pydoc_data.topics", "python": sys.version.split()[0], "max_chars": max_chars,
             "heldout_fraction": fraction, "pieces": {k: len(v) for k, v in parts.items()},
             "heldout_topics": sorted(n for n in topics() if is_heldout(n, fraction))}
    write_text(folder / "about.json", json.dumps(about, indent=1) + "\n")
    return paths


def resolve(name_or_path: str) -> Path:
    """A data file for `name_or_path`: a built-in name (written once into the cache) or the path as given."""
    if name_or_path not in BUILTIN:
        path = Path(name_or_path).expanduser()
        if path.suffix.lower() in FILE_SUFFIXES and not path.exists():  # a file name, not a hub data set
            from ..errors import DataError

            raise DataError(f"data file not found: {path}. Pass a data file, or {' / '.join(BUILTIN)} (Python's own "
                            "documentation text, offline).")
        return path
    from ..model.load import cache_dir

    folder = cache_dir() / "data" / f"pydoc-py{sys.version_info[0]}.{sys.version_info[1]}"
    path = folder / f"{BUILTIN[name_or_path]}.jsonl"
    if not path.is_file():
        write(folder)
    return path


if __name__ == "__main__":  # python -m qlora_kit.pydoc_text OUT_DIR
    if len(sys.argv) != 2:
        sys.exit("usage: python -m qlora_kit.data.pydoc_text OUT_DIR   (writes train.jsonl, heldout.jsonl, about.json)")
    for side, p in write(sys.argv[1]).items():
        print(f"{side}: {p}")
