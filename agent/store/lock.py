"""One daemon a store: a lock on `<store>.lock`, held for as long as the daemon runs.

Nothing else stops a second `edge-agent run` on the same configuration (a field engineer's manual run beside the
service): two daemons would poll the same devices twice, interleave their messages in one store and chain, and
take the broker connection from each other under one client id. The second one is refused at its start, naming
the store and the process that holds it. The lock is a POSIX record lock (`lockf`): the kernel drops it when the
process ends, however it ends (kill -9 included), and a forked child (the configuration loader's) does not hold
it. A lock file that cannot be made (a read-only disk, a store kept in memory) is logged and the daemon runs
without it: a safety monitor does not stop for want of a lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path

from agent.errors import StoreError

log = logging.getLogger(__name__)

_MODE = 0o640  # as the store: the field engineers' group may read who holds it


class StoreLock:
    """`with StoreLock(store_path):` holds the lock for the block; StoreError when another process holds it."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store.with_name(store.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, _MODE)
        except OSError as exc:
            log.warning("store lock %s cannot be made (%s): running without it, so a second agent on this store "
                        "would not be refused", self.path, exc)
            return self
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):  # else not held: no locks on this file system
                log.warning("store lock %s cannot be taken (%s): running without it", self.path, exc)
                return self
            raise StoreError(f"store {self.store} is in use by another agent{holder}: stop it first "
                             "(`systemctl stop edge-agent`), or give this one its own store.path") from None
        with contextlib.suppress(OSError):  # who holds it, for the message above; the lock itself is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with it
            self._fd = None


def _holder(fd: int) -> str:
    """` (pid N)` as the holder wrote it, or nothing when it cannot be read."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""
