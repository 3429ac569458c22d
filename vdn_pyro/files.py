"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

A result file is written under a temporary name beside its target (same directory, same
suffix, so writers that pick a format by suffix still do), flushed to disk and then
:func:`os.replace`-d over the target. When writing fails, or the process is interrupted, the
temporary is removed, the target keeps its previous content, and an :class:`OSError` names the
target rather than its temporary. The command line's run files, the figures of
:mod:`vdn_pyro.plots` and the benchmarks' tables are written this way.

Example::

    from vdn_pyro.files import atomic_path, write_text

    write_text("results/table.md", "| a | b |\\n")
    with atomic_path("results/runs.csv") as tmp:
        frame.to_csv(tmp, index=False)
"""

import contextlib
import os
from pathlib import Path

__all__ = ["atomic_path", "temporary_path", "write_text"]


def temporary_path(path):
    """The temporary name :func:`atomic_path` writes ``path`` under: hidden, beside it, with the
    process id and ``path``'s suffix.

    :param path: the target.
    :returns: a :class:`~pathlib.Path`.
    """
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _sync(path):
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path to write ``path``'s new content to; on leaving the block without
    an error it replaces ``path``, otherwise it is removed and ``path`` is left as it was. The
    directory must exist (it is not created: a run directory removed mid-run is an error).

    :param path: the target file.
    :raises OSError: from the writer or the rename, naming ``path`` (not the temporary) when the
        error named the temporary or nothing.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        _sync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`).

    :param path: the target file.
    :param str text: its new content.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    """
    if not isinstance(text, str):
        raise TypeError(f"Expected text as a str, but got {type(text).__name__}.")
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
