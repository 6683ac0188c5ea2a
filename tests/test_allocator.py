"""keep_freed_memory really changes glibc's malloc: a 64 MB block is no longer mmapped (so freeing it keeps
it), as train.py (small models) and `python -m jaxlm.eval` rely on. Each case in a fresh interpreter: the
setting is process-wide and would otherwise leak into the test process."""

from __future__ import annotations

import sys

import pytest
from helpers import run_py

PROBE = """
import ctypes, sys
from jaxlm.cpu.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = MallInfo2
block = libc.malloc(64 << 20)
print(libc.mallinfo2().hblkhd >= 64 << 20)  # True: the block came from mmap
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
@pytest.mark.parametrize(("mode", "mmapped"), [("default", "True"), ("keep", "False")])
def test_keep_freed_memory_stops_big_blocks_from_being_mmapped(mode, mmapped):
    r = run_py("-c", PROBE, mode)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == mmapped
