"""One writer per run directory: an OS file lock on RUN_DIR/.lock, held while a command writes.

The lock is the operating system's (flock on POSIX, msvcrt.locking on Windows), so it goes away
with the process that holds it: a run killed with SIGKILL never leaves a stale lock behind, and
nothing has to guess whether a PID is still alive. The holder writes its PID into the file so a
second writer can say who holds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from tformer_cli.errors import TformerError

LOCK_FILE = ".lock"
# Windows locks byte ranges and a locked range cannot be read: lock a byte past the PID text.
_WINDOWS_LOCK_OFFSET = 1 << 16


class RunLocked(TformerError):
    """Another process writes to this run directory."""

    def __init__(self, run_dir: Path, pid: int | None):
        who = f"another tformer process (PID {pid})" if pid else "another tformer process"
        super().__init__(
            f"{run_dir}: {who} is writing to this run; wait for it to finish, "
            "or write to another directory with -o"
        )
        self.run_dir, self.pid = run_dir, pid


def _try_lock(fd: int) -> bool:
    """Take the OS lock on fd without waiting; False when another process holds it."""
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def holder_pid(run_dir: str | Path) -> int | None:
    """The PID written by the current (or last) holder of run_dir's lock, if readable."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text(encoding="ascii", errors="replace")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """An exclusive, non-blocking lock on a run directory (created if missing).

    Use as a context manager (`with RunLock(run_dir): ...`), or call acquire()/release().
    acquire() raises RunLocked naming the holder's PID; try_acquire() returns False instead.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True when this object now holds it."""
        if self._fd is not None:
            return True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                return False
            # The previous holder may have removed the file between our open and our lock: then
            # we locked a file nobody else can see. Only the file at the path counts.
            if self._same_file(fd):
                break
            os.close(fd)
        self._fd = fd
        self._write_pid()
        return True

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunLocked naming the process that holds it."""
        if not self.try_acquire():
            raise RunLocked(self.run_dir, holder_pid(self.run_dir))
        return self

    def release(self) -> None:
        """Remove the lock file and let go (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Removed while still locked, so a waiter that opened the old file notices (above).
            self.path.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - Windows cannot remove an open file; it stays, unlocked
            pass
        try:
            _unlock(fd)
        finally:
            os.close(fd)

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _write_pid(self) -> None:
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode("ascii"))

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
