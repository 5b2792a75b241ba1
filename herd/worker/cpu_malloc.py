"""Keep freed memory in the process on the CPU, so that a decode step does not page-fault its temporaries in.

A CPU decode step allocates and frees tens of MB of temporaries (16 x 202k float32 logits alone are 13 MB, and
the sampler makes several). glibc's malloc gives the top of its heap back to the kernel once more than its trim
threshold lies free there, and mmaps (and unmaps at free) anything above its mmap threshold; both thresholds
move with the allocation pattern. Some patterns cross them every step, and then every step touches its
temporaries' pages afresh: the tiny model with a grammar took ~450k minor page faults per 64-token run of 16
requests (~9 ms a step), against ~25k unconstrained (benchmarks/RESULTS.md, issue 23). Fixed thresholds well
above a step's temporaries keep those pages in the process: no faults either way.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept rather than given back
MMAP_THRESHOLD = 64 << 20  # allocations from this size up are mmapped (and unmapped when freed)


def keep_freed_memory() -> bool:
    """Give back what the process has freed so far (loading's transients: converted and quantized copies of the
    weights), then set glibc malloc's thresholds; False where the C library is not glibc (nothing done)."""
    try:
        # The process's own symbols, libc's among them: find_library("c") would run ldconfig in a subprocess.
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    malloc_trim(0)
    done = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    logger.debug("malloc thresholds for CPU decode: %s", "set" if done else "not set")
    return done
