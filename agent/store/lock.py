"""One daemon a store: a lock on `<store>.lock`, held for as long as the daemon runs.

Nothing else stops a second `edge-agent run` on the same configuration (a field engineer's manual run beside the
service): two daemons would poll the same devices twice, interleave their messages in one store and chain, and
take the broker connection from each other under one client id. The second one is refused at its start, naming
the store and the process that holds it. The lock is `flock`'s: it belongs to the file as this daemon opened it,
so another open and close of the same file (a configuration naming it as a secret, say) leaves it held, and the
kernel drops it when the process ends, however it ends (kill -9 included). A forked child (the configuration
loader's) closes its copy at once, so it never holds the lock past its parent. A lock file that cannot be made (a
read-only disk, a store kept in memory) is logged and the daemon runs without it: a safety monitor does not stop
for want of a lock.
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

# anyone may read who holds it (a pid, nothing secret), and so take the lock through a read-only open: a file
# left by a manual run as root still guards the service's store
_MODE = 0o644
_held: list[int] = []  # descriptors of the locks this process holds: a forked child closes its copies


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class StoreLock:
    """`with StoreLock(store_path):` holds the lock for the block; StoreError when another process holds it."""

    def __init__(self, store: Path) -> None:
        self.store = store
        real = store.resolve()  # a store reached through a link shares the lock of the file it names
        self.path = real.with_name(real.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = _open(self.path)
        except OSError as exc:
            log.warning("store lock %s cannot be made (%s): running without it, so a second agent on this store "
                        "would not be refused", self.path, exc)
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # not held: no locks on this file system
                log.warning("store lock %s cannot be taken (%s): running without it", self.path, exc)
                return self
            raise StoreError(f"store {self.store} is in use by another agent{holder}: stop that one first (if it "
                             "is the service: systemctl stop edge-agent); two agents need a store each") from None
        with contextlib.suppress(OSError):  # who holds it, for the message above; the lock itself is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _held.append(fd)
        return self

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(ValueError):
                _held.remove(self._fd)
            os.close(self._fd)  # the lock goes with it
            self._fd = None


def _open(path: Path) -> int:
    """The lock file, made when missing; read-only when another user made it (a manual run as root): flock
    locks it all the same, so such a file never leaves the daemon unguarded."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, _MODE)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with contextlib.suppress(OSError):  # past the umask (the unit's is 0027); only its owner may
        os.fchmod(fd, _MODE)
    return fd


def _holder(fd: int) -> str:
    """` (pid N)` as the holder wrote it, or nothing when it cannot be read."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        if not text.isdigit():
            return ""
        os.kill(int(text), 0)  # a pid written by an earlier holder that is gone says nothing
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass  # alive, another user's
    except (OSError, UnicodeDecodeError, ValueError, OverflowError):
        return ""
    return f" (pid {text})"
