"""One writer per run directory: an OS lock held for the whole ``train`` command, and which temporaries are
whose.

Two commands training into one folder interleave run.log, overwrite each other's records, and the cleanup of
one deletes the other's checkpoint being written. So a run directory has a lock file, ``.lock``, which a
command locks with ``fcntl.flock`` (exclusive, non-blocking) before it reads the run's state and holds until it
ends; a second command is refused at once, naming the holder's pid (written into the lock file by whoever
holds it). The OS drops the lock when its holder exits, however it exits, so a crash never leaves a stale
lock: a leftover ``.lock`` file is harmless and reused.

A folder that does not exist yet is locked as soon as the run creates it (before it writes anything there),
so a refused request still leaves no folder behind.

Temporaries (``_files.atomic_write``: ``.NAME.<pid>.<random>.tmp``) carry their writer's pid;
``orphaned_temporary`` says whether that writer is gone, so that a cleanup removes only what nobody is
writing (``incrementer-fast eval`` writes its result into a run directory without the lock).
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path

from ..errors import InputError

__all__ = ["LOCK_FILE", "RunFolderBusy", "RunFolderLock", "orphaned_temporary"]

LOCK_FILE = ".lock"
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


class RunFolderBusy(InputError):
    """Another command holds the run directory's lock (exit status 2: nothing was done)."""


class RunFolderLock:
    """The exclusive lock of one run directory (see the module docstring).

    Args:
        folder: the run directory.
        enabled: False for a process that does not write (every torchrun rank but 0): it takes no lock.
    """

    def __init__(self, folder, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire_if_present(self) -> bool:
        """Lock the folder if it exists and this object does not hold it yet; RunFolderBusy when another
        command holds it. Returns whether this call took the lock."""
        if not self.enabled or self.held or not self.folder.is_dir():
            return False
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderBusy(
                f"{self.folder} is in use by another incrementer-fast command (pid {holder}): wait for it to end "
                "(or stop it), or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (closing the file releases it); the lock file stays, for the next command."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        self.acquire_if_present()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def orphaned_temporary(path: Path) -> bool:
    """Whether the temporary file ``path`` was left by a writer that is gone: its name carries a pid that
    is not running, or no pid at all (an older naming). This process's own pid counts as gone: the caller
    holds the run's lock and is not writing while it cleans up."""
    match = _TEMPORARY.match(Path(path).name)
    if match is None:
        return True
    pid = int(match.group(1))
    return pid == os.getpid() or not _alive(pid)
