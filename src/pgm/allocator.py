"""Keep freed CPU memory in the process instead of handing it back to the operating system.

With glibc's default malloc settings, large tensors freed by one step of a CPU forward pass
go back to the kernel (munmap, or trimming the top of the heap), and the next step's tensors,
a little larger as a sampler's clean set or KV cache grows, fault every page in again.
Measured: sampling the PGM of the text benchmark's configuration of record took about 540,000
minor page faults and 1.5 s of system time per batch of 8 (6.5-7.0 s per batch); with freed
memory kept, 3 faults and 5.5-5.6 s. Tensors above 32 MiB (glibc's largest mmap threshold)
are kept only if mmap is not used at all: MaskGIT's guided batch of 2 x 128 images took 3.7
million faults and 18.3 s, and 20,000 faults and 13.1 s without mmap. The price is that the
process keeps its peak memory (as with jemalloc or tcmalloc, which PyTorch's tuning guide
recommends on CPUs for the same reason).

`pgm` commands call `keep_freed_memory()` at start; scripts that use the library can too.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_LARGEST_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap (no mmap) and to return at most what
    exceeds 1 GiB of free heap to the system. True when the settings were taken (Linux with
    glibc), False elsewhere, where nothing changes."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # Setting either threshold turns off glibc's own adjustment of both, so both are set; the
    # mmap threshold still matters if something turns mmap back on.
    return all(mallopt(option, value) for option, value in ((_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD),
                                                           (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_MMAP_MAX, 0)))
