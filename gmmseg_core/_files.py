"""Crash-safe file writes and progress bars that suit a log file as well as a terminal."""

from __future__ import annotations

import os
import sys
from contextlib import suppress
from pathlib import Path

LOG_REFRESH_S = 30.0   # seconds between progress-bar redraws when stderr is a file or a CI log


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
    tmp = path.with_name(path.name + ".tmp")
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
