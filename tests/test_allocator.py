import platform
import subprocess
import sys

import pytest

CHURN = """
import resource, sys, torch
from pgm.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def churn():
    for step in range(1, 17):  # activations that grow step by step, as a sampler's clean set does
        tensors = [torch.ones(step * 64 * 1024) for _ in range(6)]
        tensors.append(torch.ones((40 << 20) // 4 + step * 1024))  # above glibc's largest mmap threshold
        del tensors
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_kept_memory_serves_growing_tensors_without_page_faults():
    kept, faults = page_faults("keep")
    assert kept == "True" and faults < 1000  # 0, or 386 with some heap layouts
    default_kept, default_faults = page_faults("default")
    assert default_kept == "False" and default_faults > 100_000  # what the setting removes (about 200,000)
