"""Giving freed host memory back to the operating system between linears.

Quantizing one linear allocates float32 temporaries of its size (tens of MiB at 2B width) and
keeps small results (integers, scales, packed words). glibc serves allocations below its
dynamic mmap threshold (up to 32 MiB) from the heap, where the kept results end up between the
freed temporaries, so the freed space is neither returned nor always reused: measured at
Qwen2-VL-2B width, RTN and export held ~1 GiB more than their live tensors. `malloc_trim`
returns free heap pages to the system; calling it once per linear costs far less than the
linear's own work. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_free_heap() -> None:
    """Returns the heap's free pages to the operating system (glibc's malloc_trim(0))."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
