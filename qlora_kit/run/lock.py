"""One `train` per run folder: an exclusive lock held from the first check of RUN_DIR to the last byte written.

The lock is `flock(2)` on RUN_DIR/.qlora-kit.lock, which holds the holder's pid. The kernel drops a flock when its
process dies, however it dies (SIGKILL included), so a lock file left by a dead process is stale by construction:
the next `train` takes it over and says whose it was. Several processes of one launch (torchrun) share the lock:
only global rank 0 takes it, and every rank stops when rank 0 cannot (distributed.World.agree).

The file is removed on release. Whoever locks re-checks, after locking, that the path still names the file it
locked (the same inode); otherwise a releaser removed it in between and the lock is taken again on the new file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

from ..errors import ConfigError

LOCK_NAME = ".qlora-kit.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunLock:
    """`acquire()` or ConfigError naming the holder's pid; `release()` is idempotent. Also a context manager."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False

    def acquire(self) -> None:
        if not self.run_dir.exists():
            self.created_dir = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # a loop only while releasers remove the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _read_pid(self.path)
                raise ConfigError(f"run folder {self.run_dir} is in use by another `qlora-kit train` (pid "
                                  f"{holder if holder is not None else 'unknown'}); one run writes a folder at a "
                                  "time. Wait for it to end (or stop it), or choose another folder with --out."
                                  ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            if old.isdigit() and int(old) != os.getpid() and not _pid_alive(int(old)):
                print(f"{self.run_dir}: taking over the lock of pid {old}, which is no longer running",
                      file=sys.stderr)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return
        raise ConfigError(f"run folder {self.run_dir}: could not lock {self.path} (it keeps being replaced).")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can hold this inode meanwhile
        finally:
            os.close(self.fd)
            self.fd = None
        if self.created_dir:  # a run that stopped before writing anything leaves no empty folder behind
            try:
                self.run_dir.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
