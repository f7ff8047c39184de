"""Where records come from: `data.path` -> an iterator of (place, record), plus a content fingerprint for the cache.

- `.jsonl` / `.json`: read here, streamed line by line (a 1 GB file is never whole in memory), so that an error
  names the file and its 1-based line ("d.jsonl:3: invalid JSON"), which the `datasets` JSON loader cannot do.
- `.parquet`, `.csv`, `.arrow` (IPC stream or file), a folder written by `Dataset.save_to_disk` (or a folder of data
  files), and hub data set names go through the `datasets` library: the reader users already know, memory-mapped
  Arrow underneath. Its Arrow cache lives in data_cache_root()/datasets. Hub names need the network; offline
  (HF_HUB_OFFLINE=1) they fail with a message saying so, unless `datasets` has them cached.
- `data.columns` {our field: your column} renames columns before validation; `data.split` / `data.subset` pick a
  split and a configuration where the source has them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from ..config import DataConfig
from .formats import FORMAT_HELP, REQUIRED, fields
from ..errors import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def data_cache_root() -> Path:
    """Tokenized data and the `datasets` Arrow cache: $QLORA_KIT_DATA_CACHE, else <qlora-kit cache>/data."""
    if os.environ.get("QLORA_KIT_DATA_CACHE"):
        return Path(os.environ["QLORA_KIT_DATA_CACHE"])
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit")) / "data"


def kind(path: str) -> str:
    """'json' | 'datasets' (a local file or folder for `datasets`) | 'hub'; DataError when none fits."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in JSON_SUFFIXES:
            return "json"
        if p.suffix.lower() in BUILDERS:
            return "datasets"
        raise DataError(f"data file {p} has an unknown suffix '{p.suffix}'; qlora-kit reads "
                        f"{', '.join(JSON_SUFFIXES + tuple(BUILDERS))} files, folders written by save_to_disk, and "
                        "hub data set names. Rename or convert the file.")
    if p.is_dir():
        return "datasets"
    if p.suffix.lower() in JSON_SUFFIXES + tuple(BUILDERS) or not _HUB_NAME.match(path) or path.startswith("."):
        raise DataError(f"data file not found: {p}. Set data.path to a .jsonl/.json/.parquet/.csv/.arrow file, a "
                        "folder written by save_to_disk, or a hub data set name.")
    return "hub"


def _offline() -> bool:
    truthy = {"1", "ON", "YES", "TRUE"}
    return any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _map_columns(record: dict, columns: dict[str, str], place: str) -> dict:
    """{our field: your column}: the mapped columns take our names (swaps work); other columns stay as they are."""
    if not columns:
        return record
    for ours, theirs in columns.items():
        if theirs not in record:
            raise DataError(f"{place}: data.columns maps '{ours}' to column '{theirs}', which is not there (found: "
                            f"{', '.join(map(str, record)) or 'no fields'}). Fix data.columns.")
    out = {k: v for k, v in record.items() if k not in columns.values()}
    out.update({ours: record[theirs] for ours, theirs in columns.items()})
    return out


# ------------------------------------------------------------------------------------------------------ JSON files


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """[(FILE:LINE, value)] streamed; lines split at b"\\n" only (U+2028 may sit inside a JSON string)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM (Windows editors) is no record
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno} is not UTF-8 ({e.reason} at byte {e.start} of the line); re-save "
                                "it as UTF-8.") from None
            if line.strip():  # blank lines are fine (a trailing newline, grouping)
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit int, deep nesting
                    raise DataError(f"{path}:{lineno}: invalid JSON ({_why(e)}); write one record a line.") from None


def _json_list(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8.") from None
    try:
        items = json.loads(text) if text.strip() else []
    except (ValueError, RecursionError) as e:
        line = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{path}{line}: invalid JSON ({_why(e)}); fix it there.") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json data file must hold a list of objects; or use .jsonl, one object a line.")
    yield from ((f"{path} item {i}", item) for i, item in enumerate(items, 1))


def _why(e: Exception) -> str:
    return f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e) or type(e).__name__


# -------------------------------------------------------------------------------------------- the datasets library


def open_table(cfg: DataConfig):
    """-> a `datasets.Dataset` (memory-mapped Arrow) for a datasets-kind or hub data.path, split and subset applied."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {cfg.path} needs the `datasets` library: pip install 'qlora-kit[data]' (or use "
                        ".jsonl)."
                        ) from None
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to read file" log: we say it better
    datasets.disable_progress_bars()
    where, path = kind(cfg.path), Path(cfg.path)
    cache = str(data_cache_root() / "datasets")
    empty = DataError(f"{cfg.path}: split '{cfg.split}' is empty (0 rows); pick another split with data.split, or "
                      "add records.")
    try:
        if where == "datasets" and path.is_dir() and (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]  # save_to_disk of a DatasetDict
            if cfg.split not in splits:
                raise DataError(f"{path} has no split '{cfg.split}' (it has: {', '.join(splits)}); set data.split "
                                "to one of them.")
            path = path / cfg.split  # load only that split: datasets cannot load a dict holding an empty split
        if where == "datasets" and path.is_dir() and (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif where == "datasets" and path.is_file():
            builder = BUILDERS[path.suffix.lower()]
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            if builder == "csv":  # every cell is text: `42` or `NA` is an answer, not an int or a missing value;
                # only an empty cell is null (absent), as before
                extra |= {"keep_default_na": False, "na_values": [""]}
                extra |= _text_columns(path, extra.get("delimiter", ","), datasets)
            if builder == "parquet":
                import pyarrow.parquet as pq

                if pq.read_metadata(path).num_rows == 0:  # datasets fails on it with a bare "generation error"
                    raise empty
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", cache_dir=cache,
                                           **extra)
        else:  # a folder of data files, or a hub name
            loaded = datasets.load_dataset(str(cfg.path), cfg.subset, split=cfg.split, cache_dir=cache)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (ValueError, FileNotFoundError, ConnectionError, ...)
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if where == "hub" and _offline():
            raise DataError(f"data.path {cfg.path!r} is not a local file or folder, so it would be a hub data set, "
                            "but the hub is offline here (HF_HUB_OFFLINE=1). Download it once with network access "
                            "(or save_to_disk it) and point data.path at the local copy.") from None
        if "corresponds to no data" in cause or (isinstance(e, IndexError) and (path / "state.json").is_file()):
            raise empty from None  # datasets' words for 0 rows: a header-only CSV, an empty saved split
        if "split" in cause.lower():
            raise DataError(f"{cfg.path}: cannot read split '{cfg.split}' ({cause}); set data.split.") from None
        if where == "datasets" and path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
            problem = _csv_problem(path, "\t" if path.suffix.lower() == ".tsv" else ",")
            if problem:
                raise DataError(f"{cfg.path} {problem}") from None
        root = _root_cause(e)
        if root is not e:
            cause = f"{cause}; because {type(root).__name__}: {str(root).strip()[:200]}"
        raise DataError(f"cannot read {cfg.path} with the datasets library ({type(e).__name__}: {cause}). Check the "
                        "file, data.subset and data.split.") from None
    if len(loaded) == 0:
        raise empty
    _check_columns(cfg, list(loaded.column_names), str(cfg.path))
    return loaded


def _text_columns(path: Path, delimiter: str, datasets) -> dict:
    """{"features": every header column as a string} for a CSV whose header reads; {} otherwise (datasets then
    reports what is wrong with the file)."""
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (UnicodeDecodeError, csv.Error, OSError):
        return {}
    if not header or len(set(header)) != len(header):
        return {}
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})}


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception: datasets wraps the CSV reader's own (and telling) error in DatasetGenerationError."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    return e


def _csv_problem(path: Path, delimiter: str) -> str | None:
    """After datasets failed on a CSV (its error names no row): read it again with Python's csv module, and say
    what is wrong in words that say how to fix it. None: nothing found here."""
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = csv.reader(f, delimiter=delimiter)
            header = next(rows, None)
            if not header:
                return "is empty (not even a header row); write a header row and at least one record."
            for row in rows:
                if len(row) > len(header):
                    return (f"line {rows.line_num} has {len(row)} fields, the header {len(header)}; quote cells "
                            "that contain the delimiter, or fix that row.")
    except UnicodeDecodeError as e:
        return (f"is not UTF-8 ({e.reason} at byte {e.start} of the file; Latin-1 or cp1252, perhaps); re-save it "
                "as UTF-8.")
    except csv.Error as e:
        return f"is not a well-formed CSV ({e}); fix it there."
    return None


def _check_columns(cfg: DataConfig, columns: list[str], where: str) -> None:
    for ours, theirs in cfg.columns.items():
        if theirs not in columns:
            raise DataError(f"{where}: data.columns maps '{ours}' to column '{theirs}', which it does not have "
                            f"(columns: {', '.join(columns)}). Fix data.columns.")
    have = {ours for ours in cfg.columns} | (set(columns) - set(cfg.columns.values()))
    missing = [k for k in REQUIRED[cfg.format] if k not in have]
    if missing:
        pairs = ", ".join(f"{k}: YOUR_COLUMN" for k in missing)
        raise DataError(f"{where} has no column {', '.join(repr(m) for m in missing)} (columns: {', '.join(columns)})"
                        f"; the {cfg.format} format needs {FORMAT_HELP[cfg.format]}. Map your columns, e.g. "
                        f"--set 'data.columns={{{pairs}}}', or set data.format.")


def read(cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """(place, raw record with columns mapped) for every record, streamed; DataError when there is none."""
    unknown = [k for k in cfg.columns if k not in fields(cfg.format)]
    if unknown:
        raise DataError(f"data.columns names {', '.join(map(repr, unknown))}, which the {cfg.format} format does not "
                        f"read; its fields are {', '.join(fields(cfg.format))} (write {{our field: your column}}).")
    where, path = kind(cfg.path), Path(cfg.path)
    count = 0
    if where == "json":
        rows = _json_list(path) if path.suffix.lower() == ".json" else _json_lines(path)
    else:
        table = open_table(cfg)
        rows = ((f"{cfg.path} row {i}", r) for i, r in enumerate(table, 1))
    for place, record in rows:
        count += 1
        yield place, _map_columns(record, cfg.columns, place) if isinstance(record, dict) else record
    if count == 0:
        raise DataError(f"{cfg.path} holds no records; add at least one record like {FORMAT_HELP[cfg.format]}.")


def fingerprint(cfg: DataConfig) -> str:
    """sha256 of the data's bytes (a file; every file of a folder, with names), or `datasets`' fingerprint of a hub
    split (a hash of its cached files): the data part of the tokenize-once cache key."""
    h = hashlib.sha256()
    path = Path(cfg.path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:  # a hub data set
        h.update(open_table(cfg)._fingerprint.encode())
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
