"""Process-wide malloc settings that make large uploads cheaper (for programs, not libraries).

glibc serves allocations above its mmap threshold (128 KiB at first, then
adapting) with fresh ``mmap``s and gives freed heap back to the kernel above
its trim threshold: an uploading client that makes a 1 MiB buffer per frame
then pays a page fault per 4 KiB of every buffer.  Raising both thresholds
lets the buffers be reused.  Measured here (docs/performance.md): the
client's CPU per GiB uploaded fell by about a third with 1 MiB frames, and
the server's by a quarter because it parses eight times fewer frames; the
server itself gained nothing measurable from the same settings, so it is not
tuned.

Changing malloc is a decision for the program, not for a library: the
``wsfiles`` command calls :func:`tune_malloc`, and so may any application
using :mod:`wsfiles.client` that moves big files.  Elsewhere than glibc it
does nothing.  Cost: up to TRIM_THRESHOLD bytes of freed memory stay with
the process instead of going back to the kernel.
"""

from __future__ import annotations

import ctypes

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024

_tuned = False


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if done (or done before)."""
    global _tuned
    if _tuned:
        return True
    try:
        # The process's own symbols, libc's among them: no ctypes.util.find_library,
        # which runs ldconfig (or gcc) in a subprocess at every start.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        mallopt = None
    if mallopt is None:
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _tuned


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has raised the thresholds in this process."""
    return _tuned
