"""One way to write a file or a folder so that a crash never leaves half of it (docs/ARCHITECTURE.md, "On-disk
formats").

Both helpers write into a temporary name beside the target (`.NAME.tmp-PID`, same filesystem, so the rename is
atomic), fsync the data, rename, then fsync the parent folder (a rename survives a power cut only once its folder
is on disk). On any exception the temporary is removed and the target is untouched.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a file, link or folder if present (never follows a link into its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write (by name: savefig, save_file, write_text); on success it is
    fsynced and becomes `path`, replacing an old one in one step."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise named(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def named(error: OSError, path: Path) -> OSError:
    """`error` with `path` as its file name when it has none: a write() that fails with ENOSPC names no file, and
    "No space left on device" alone does not say which write lost."""
    if error.filename is None and error.errno is not None:
        return type(error)(error.errno, error.strerror, str(path))
    return error


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_folder(path: Path, replace: bool = False, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder beside `path` (or `tmp`, a sibling name the caller chooses); on
    success every file in it is fsynced and it becomes `path`. An existing `path` is replaced only with
    `replace=True`: it is moved aside first and deleted after, so a failure at any point leaves it intact; without
    it, FileExistsError. On any exception the temporary folder is removed."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temp_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fsync_file(Path(root) / name)
            fsync_dir(Path(root))
        if path.exists() or path.is_symlink():
            if not replace:
                raise FileExistsError(f"{path} appeared while it was being written")
            old = temp_name(path, "old")
            remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        remove(tmp)
        raise
