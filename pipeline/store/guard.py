"""What keeps concurrent and killed converts from harming a folder: locks and worker lifetimes.

- Locks: a convert holds an OS lock (`fcntl.flock`) on `DIR/.parts/batchNN.lock` for every zip
  it was given, from the moment it decides whether to redo the zip until the manifest is written,
  and on `DIR/.parts/manifest.lock` while it removes or writes the manifest. A second convert of
  the same batches waits (or, with `wait=False`, refuses); converts of disjoint batches run side
  by side, as several machines converting their share into one shared folder do. The kernel
  drops a lock when its process dies (even by `kill -9`), so a lock is never stale. On NFS,
  Linux maps flock to POSIX locks, which work across machines where the server has locking
  (NFSv4, or NFSv3 with lockd); with `nolock` mounts they guard one machine only.
- Workers: a pool worker ends when the convert that started it is gone (`kill -9` included),
  instead of waiting forever on a pipe no one writes.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import multiprocessing
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCKS_DIR = ".parts"  # beside the records (store.catalog's PARTS_DIR)
PR_SET_PDEATHSIG = 1  # linux/prctl.h: a signal for this process when its parent dies
_HELD: set[int] = set()  # lock fds this process holds (a forked worker closes its copies)


class FolderBusy(ValueError):
    """Another convert holds a lock this one needs (and it was told not to wait)."""


def lock_path(out: Path, name: str) -> Path:
    """The lock file for `name` (`batch03`, `manifest`) of a shard folder."""
    return Path(out) / LOCKS_DIR / f"{name}.lock"


@contextmanager
def locked(out: Path, names: Iterable[str], wait: bool = True) -> Iterator[None]:
    """Hold the locks of `names` (taken in sorted order, so two converts never deadlock)."""
    with ExitStack() as stack:
        for name in sorted(set(names)):
            stack.enter_context(_one_lock(out, name, wait))
        yield


def is_locked(out: Path, name: str) -> bool:
    """True when another process holds the lock of `name` (this one does not take it)."""
    path = lock_path(out, name)
    try:
        fd = _open_lock(path, os.O_RDWR)  # writable: NFS maps flock to POSIX write locks
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the lock just taken
    return False


@contextmanager
def _one_lock(out: Path, name: str, wait: bool) -> Iterator[None]:
    path = lock_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(path, os.O_RDWR | os.O_CREAT)
    try:
        _acquire(fd, path, name, wait)
        _HELD.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            _HELD.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)  # drops it even where a forked child shares the fd
    finally:
        os.close(fd)


def _open_lock(path: Path, flags: int) -> int:
    """A lock file's descriptor; ValueError naming it if it is a symlink or not a regular file.

    A lock is truncated and written, so a symlink or a hard link planted at its name would
    overwrite the file it points to, and two locks linked to one file would deadlock a convert:
    never follow one, nor write a file with another name.
    """
    try:  # O_NONBLOCK: a FIFO at the name is refused below instead of waited on
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if not os.path.islink(path):  # ELOOP (EMLINK on BSD) is what O_NOFOLLOW gives
            raise
        raise ValueError(f"{path}: {_NOT_A_LOCK % 'a symlink'}") from exc
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(found.st_mode) else "a device or socket"
            raise ValueError(f"{path}: {_NOT_A_LOCK % kind}")
        if found.st_nlink > 1:  # a hard link to another file, which writing would change
            raise ValueError(f"{path}: {_NOT_A_LOCK % 'a hard link to another file'}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


_NOT_A_LOCK = "a lock file must be a regular file, not %s: remove it (convert makes its own)"


def _acquire(fd: int, path: Path, name: str, wait: bool) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    busy = f"{path.parent.parent}: another convert ({holder}) is writing {name} there"
    if not wait:
        raise FolderBusy(f"{busy}; wait for it to finish (or convert without --no-wait)")
    log.warning("%s: waiting for it to finish", busy)
    fcntl.flock(fd, fcntl.LOCK_EX)
    log.info("%s: lock taken, going on", path)


# ---------------------------------------------------------------- worker lifetimes


def die_with_parent() -> None:
    """Make this pool worker end when its parent does; ignore Ctrl-C (the parent handles it).

    Linux: the kernel sends SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG). Elsewhere a
    thread polls the parent id. Lock fds copied by the fork are closed: only the parent holds.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in list(_HELD):
        _close_quietly(fd)
    _HELD.clear()
    parent = os.getppid()
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    origin = multiprocessing.parent_process()
    if os.getppid() != parent or (origin is not None and not origin.is_alive()):
        os._exit(1)  # the parent died before the signal was set: none will come


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
