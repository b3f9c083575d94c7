"""The allocator settings keep a freed activation-sized block for reuse instead of handing it back
to the kernel, which would page-fault it in again on the next step."""

import os
import subprocess
import sys

import pytest

from kpscale.train import allocator

# Allocates, fills and frees a 64 MiB block (as a training step does its activations) ten times,
# in the main thread or, like the loop in a Ray Train worker, in another; prints the page faults
# of the last nine.
PROBE = """
import ctypes, resource, sys, threading
from kpscale.train.allocator import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "call":
    keep_freed_memory()
faults = []
def step():
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(2**26)
        ctypes.memset(block, 1, 2**26)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[2] == "main":
    step()
else:
    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
print(sum(faults[1:]))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")


def page_faults(call: str, where: str, env: dict | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, call, where], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return int(out.stdout.split()[-1])


def test_default_malloc_faults_every_reallocation():
    # 64 MiB is above glibc's largest adaptive mmap threshold: each allocation is a fresh mapping.
    assert page_faults("none", "main") > 9 * 10_000
    assert page_faults("none", "thread") > 9 * 10_000


def test_worker_environment_keeps_freed_blocks_in_a_thread():
    assert page_faults("none", "thread", allocator.ENV) < 1_000


def test_keep_freed_memory_in_a_running_process():
    assert page_faults("call", "main") < 1_000
