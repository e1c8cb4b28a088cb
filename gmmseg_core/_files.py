"""Crash-safe file writes, a lock on a directory that dies with its process, and progress bars that suit a log
file as well as a terminal."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import suppress
from pathlib import Path

LOG_REFRESH_S = 30.0   # seconds between progress-bar redraws when stderr is a file or a CI log


def utc_timestamp() -> str:
    """The current time as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC), as the run records (lock files, timings) write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def temporary_path(path) -> Path:
    """The temporary file :func:`atomic_write` writes before it replaces ``path``: ``<name>.tmp`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def atomic_write(path, write) -> Path:
    """``write(tmp)`` on a temporary file beside ``path``, then ``os.replace(tmp, path)``.

    ``path`` holds its old content or its new one, never a torn mix: a kill at any moment leaves it whole (at
    worst with a stray ``<name>.tmp`` beside it, which the next write replaces). A write that fails, such as one
    on a full disk (``OSError``, or the ``RuntimeError`` ``torch.save`` raises there), removes the temporary file
    and raises ``OSError`` naming ``path``, which is left as it was; any other exception passes unchanged.

    Parameters
    ----------
    path : str or Path
    write : callable
        ``write(tmp_path)`` writes the whole new content to ``tmp_path``.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            state = "left as it was" if path.exists() else "not written"
            hint = "" if isinstance(err, OSError) else " (is the disk full?)"   # torch.save says only "file write failed"
            raise OSError(f"cannot write {str(path)!r}{hint}: {type(err).__name__}: {err}; the file is {state}") from err
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """``Path(path).write_text(text)`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def progress_bar(*args, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)``, redrawn at most every ``LOG_REFRESH_S`` seconds when stderr is not a
    terminal (a log file, a CI job), where each of tqdm's ten redraws a second would stay in the log. A terminal
    or a Jupyter kernel keeps tqdm's own rate; an explicit ``mininterval`` wins."""
    from tqdm.auto import tqdm

    isatty = getattr(sys.stderr, "isatty", None)
    interactive = (callable(isatty) and isatty()) or "ipykernel" in sys.modules
    if not interactive:
        kwargs.setdefault("mininterval", LOG_REFRESH_S)
    return tqdm(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ directory locks
try:
    import fcntl
except ImportError:        # Windows: no flock; DirectoryLock then locks nothing
    fcntl = None

_HELD: set[int] = set()     # descriptors of the locks this process holds


def _close_held_in_child() -> None:
    # a forked child (a DataLoader worker) shares the parent's open lock file, and with it the lock: closing its
    # copy lets the lock end with the parent even while the child lives on for a few seconds
    for fd in _HELD:
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class DirectoryInUseError(OSError):
    """Another process holds the :class:`DirectoryLock` of a directory.

    Attributes
    ----------
    folder : Path
    holder : dict or None
        ``{"pid", "host", "since"}`` of the holding process, as its lock file records it; None when unknown.
    """

    def __init__(self, message: str, folder, holder: dict | None):
        super().__init__(message)
        self.folder, self.holder = Path(folder), holder


class DirectoryLock:
    """An exclusive lock on a directory that one process at a time may hold, released when that process ends.

    ``acquire`` creates the directory if needed and takes ``fcntl.flock`` on the file ``name`` in it: the
    operating system drops such a lock when its holder exits, however it exits (``kill -9`` and crashes included),
    so a directory that a dead process left behind is never locked. The file records the holder's pid, host and
    start time for the error of a process that finds the lock taken; ``release`` removes it (a killed holder
    leaves it, unlocked). A second ``acquire`` on the same directory fails in the holding process too.

    The lock is advisory (it keeps out only code that takes it) and needs ``fcntl``: on a platform without it
    (Windows) ``acquire`` succeeds without locking anything, and ``locked`` is False. On a network file system
    it is as good as that file system's support of ``flock``.

    Parameters
    ----------
    folder : str or Path
    name : str
        File name of the lock inside ``folder``.
    """

    def __init__(self, folder, name: str = "train.lock"):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None
        self._pid = os.getpid()
        self._created: list[Path] = []

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self, advice: str = "") -> DirectoryLock:
        """Take the lock, or raise :class:`DirectoryInUseError` at once naming the directory and its holder,
        followed by ``advice``. Returns self."""
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing          # deepest first: removed again by release() while they are empty
        if fcntl is None:
            return self
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:     # a releasing holder has just removed the directory it had created
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                who = ("another process" if holder is None else
                       f"process {holder.get('pid')} on host {holder.get('host')!r} (since {holder.get('since')})")
                raise DirectoryInUseError(f"the directory {str(self.folder)!r} is in use by {who}, which holds "
                                          f"its lock file {self.path.name!r}" + (f"; {advice}" if advice else ""),
                                          self.folder, holder) from None
            if self._is_current(fd):
                break
            os.close(fd)          # its holder removed that file on release, between the open and the lock
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": utc_timestamp()})
        with suppress(OSError):          # a full disk: the lock holds all the same, its record stays empty
            os.ftruncate(fd, 0)
            os.write(fd, record.encode())
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(fd)
        return self

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at ``self.path`` (not one a releasing holder has just removed)."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):      # gone, or not yet written by a holder that has just taken it
            return None
        return holder if isinstance(holder, dict) else None

    def release(self) -> None:
        """Drop the lock and remove its file, and the directories ``acquire`` created if they are empty. Nothing in
        a forked child of the holder, which holds neither (its copy of the descriptor was closed at the fork)."""
        if os.getpid() != self._pid:
            return
        if self._fd is not None:
            with suppress(OSError):
                self.path.unlink()       # before the unlock: a process waiting on this file then takes a new one
            _HELD.discard(self._fd)
            os.close(self._fd)
            self._fd = None
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:              # not empty (the run wrote files), or gone
                break
        self._created = []

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
