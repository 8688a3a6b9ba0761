"""The errors a user can act on. The command line prints each as one line naming the file,
field or path at fault and exits with status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import errno
import os

__all__ = ["UserError", "OutputError", "MissingExtraError", "output_error", "writing_to", "require_extra"]


class UserError(Exception):
    """An error caused by the user's input or environment: printed as one clear line, exit code 2."""


class OutputError(UserError, OSError):
    """Writing an output failed (disk full, read-only or vanished folder, no permission). The message
    names the path and what to do; whatever was there before the write is left as it was."""


class MissingExtraError(UserError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the
    extra to install (``pip install 'axial-deeplab[extra]'``)."""

    def __init__(self, feature: str, extra: str, packages: str):
        super().__init__(f"{feature} needs {packages}: pip install 'axial-deeplab[{extra}]'")


def require_extra(module: str, feature: str, extra: str, packages: str | None = None):
    """Import and return ``module``, or raise :class:`MissingExtraError` naming ``extra``
    (``packages``: what to call the missing distribution, default the module's top name)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(feature, extra, packages or module.split(".")[0]) from None


_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space (or choose another output folder) and run again",
    errno.EDQUOT: "the disk quota is exhausted; free some space and run again",
    errno.EROFS: "the file system is read-only; choose a writable output folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.ENOENT: "the folder vanished while writing; check the path and run again",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another output path",
    errno.EEXIST: "the path is in the way; remove it or choose another output path",
}


def output_error(path: str | os.PathLike, err: BaseException) -> OutputError:
    """An :class:`OutputError` for a failed write of ``path`` (``err`` is the OSError or the
    error a library raised for it, e.g. torch.save's RuntimeError on a full disk)."""
    code = getattr(err, "errno", None)
    if code is None and "unexpected pos" in str(err):  # torch.save's zip writer on a full disk
        code = errno.ENOSPC
    advice = _ADVICE.get(code, f"{getattr(err, 'strerror', None) or err}")
    out = OutputError(f"cannot write {os.fspath(path)}: {advice}")
    out.errno = code
    return out


@contextlib.contextmanager
def writing_to(path: str | os.PathLike):
    """Turn an OSError of a write (disk full, read-only folder, ...) into an OutputError naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise output_error(path, e) from e
