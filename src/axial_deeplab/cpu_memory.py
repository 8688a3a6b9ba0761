"""Keep freed memory in the process (glibc Linux): no page faults for every training step's tensors.

glibc's malloc hands memory at the top of its heap back to the system once more than its trim
threshold is free there (adaptive: twice the largest ``mmap``-served block freed so far), and serves
blocks over its mmap threshold with fresh mappings. A training step frees most of its activations
at its end, so the next step page-faults them in again: measured on this project's 2-core CPU
machine, 2400 minor faults and 6 ms of system time in a 60 ms layer-pair step at 2x64x56x56, and
31k faults (63 ms) per Axial-ResNet-S step at 4x3x224x224, against none for the 3x3 conv or
ResNet-50. PyTorch's CPU allocator keeps no cache of its own; jemalloc or tcmalloc (``LD_PRELOAD``)
are the usual cure. :func:`keep_freed_memory` gets the same effect from the system allocator with
fixed thresholds (``mallopt``): freed memory stays in the process up to 1 GiB, and blocks up to
32 MiB (glibc's largest mmap threshold) come from the heap.

The ``axial-deeplab`` command calls it at start; a program using the library calls it itself.
It does nothing where the user chose otherwise: ``AXIAL_DEEPLAB_KEEP_FREED_MEMORY=0``, glibc's own
``MALLOC_*_`` variables or ``GLIBC_TUNABLES`` malloc settings, or another allocator preloaded.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["keep_freed_memory", "ENV_KEEP_FREED_MEMORY", "TRIM_THRESHOLD", "MMAP_THRESHOLD"]

ENV_KEEP_FREED_MEMORY = "AXIAL_DEEPLAB_KEEP_FREED_MEMORY"
TRIM_THRESHOLD = 1 << 30  # bytes free at the heap's top before glibc returns them to the system
MMAP_THRESHOLD = 1 << 25  # blocks above this get their own mapping (32 MiB: glibc's maximum)
# mallopt parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied = None  # None: not asked yet; else the first answer


def _refusal() -> str:
    """Why the thresholds are left alone ("" when they can be set)."""
    if os.environ.get(ENV_KEEP_FREED_MEMORY, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_KEEP_FREED_MEMORY} is off"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not Linux with glibc"
    if any(name in os.environ for name in _USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "the environment sets glibc's malloc thresholds already"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    return ""


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds (see the module doc) once per process; True when they
    are set (now or by an earlier call), False where it does nothing."""
    global _applied
    if _applied is None:
        _applied = False
        if not _refusal():
            try:
                libc = ctypes.CDLL("libc.so.6")
            except OSError:
                return False
            _applied = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
                libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            )
    return _applied
