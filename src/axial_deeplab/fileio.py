"""Atomic file writes: a temporary file in the target folder, then one ``os.replace``, so a
reader (or an interrupted run) sees either the old file or the whole new one, never a torn one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Optional

import numpy as np

from .errors import output_error


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder for the caller to write; when the block ends
    normally it gets the usual permissions and is renamed to ``path`` in one ``os.replace``,
    otherwise it is removed and ``path`` is left as it was. A failure to create the temporary
    file or to rename it raises :class:`~axial_deeplab.errors.OutputError` naming ``path``;
    errors raised inside the block pass through unchanged."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as e:
        raise output_error(path, e) from e
    try:
        yield tmp
        try:
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; use the usual permissions
            os.replace(tmp, path)
        except OSError as e:
            raise output_error(path, e) from e
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path``. ``fsync=False`` skips flushing to disk (for many small
    outputs where a crash may lose the newest file but never leaves a partial one).

    A failed write (disk full, read-only or vanished folder, no permission) raises
    :class:`~axial_deeplab.errors.OutputError` naming ``path``; the temporary file is removed
    and whatever ``path`` held before is left as it was."""
    with atomic_output(path) as tmp:
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise output_error(path, e) from e


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def json_default(o):
    """JSON encoding of the NumPy / torch values our results carry."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    if type(o).__module__.startswith("torch") and hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: Optional[int] = 2, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n", fsync=fsync)
