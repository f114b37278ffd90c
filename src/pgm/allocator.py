"""Keep freed CPU memory in the process instead of handing it back to the operating system.

With glibc's default malloc settings, large tensors freed by one step of a CPU forward pass
go back to the kernel (munmap, or trimming the top of the heap), and the next step's tensors,
a little larger as a sampler's clean set or KV cache grows, fault every page in again. Sampling the PGM of the text benchmark's
configuration of record took about 540,000 minor page faults and 1.5 s of system time per
batch of 8 (6.5-7.0 s per batch); with freed memory kept, 3 faults and 5.5-5.6 s. The price
is that the process keeps its peak memory (as with jemalloc or tcmalloc, which PyTorch's
tuning guide recommends on CPUs for the same reason).

`pgm` commands call `keep_freed_memory()` at start; scripts that use the library can too.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to serve allocations up to 32 MiB from its heap and to return at most what
    exceeds 1 GiB of free heap to the system. True when the settings were taken (Linux with
    glibc), False elsewhere, where nothing changes."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # Setting either threshold turns off glibc's own adjustment of both, so both are set.
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
