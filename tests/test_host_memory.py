"""keep_freed_memory: a freed 64 MB block is reused without its memory being mapped in again; CPU runs only."""

import os
import subprocess
import sys

import pytest

from flax_gpt.host_memory import OPT_OUT, glibc

# Bytes that become resident when a freshly malloc'ed 64 MB block is written, per reuse: the memory that had to be
# mapped and zeroed again. Read from /proc/self/statm in bytes, so the size of the pages (4 KiB, or 2 MiB with
# transparent huge pages) does not matter, as it did for a count of page faults.
NEW_BYTES_PER_REUSE = """
import ctypes, os
from flax_gpt.host_memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20

def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def touch_and_free():
    block = libc.malloc(ctypes.c_size_t(size))
    before = resident_bytes()
    ctypes.memset(block, 1, size)  # write every byte
    grown = resident_bytes() - before
    libc.free(ctypes.c_void_p(block))
    return grown

touch_and_free()
print(applied, sum(touch_and_free() for _ in range(5)) // 5)
"""
BLOCK = 64 << 20
NEEDS = pytest.mark.skipif(glibc() is None or not os.path.exists("/proc/self/statm"),
                           reason="glibc's malloc tuning, and /proc/self/statm to read resident memory")


def new_bytes_per_reuse(env_extra: dict) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT} | env_extra
    out = subprocess.run([sys.executable, "-c", NEW_BYTES_PER_REUSE], env=env, capture_output=True, text=True,
                         check=True)
    applied, grown = out.stdout.split()
    return applied == "True", int(grown)


@NEEDS
def test_freed_memory_is_reused_without_being_mapped_again():
    applied, grown = new_bytes_per_reuse({})
    assert applied
    # measured 0 bytes; 1 MiB leaves room for the interpreter's own allocations between the two reads
    assert grown <= 1 << 20, f"{grown} bytes newly resident per reuse of a 64 MB block; expected ~0"


@NEEDS
def test_opt_out_leaves_malloc_alone():
    applied, grown = new_bytes_per_reuse({OPT_OUT: "1"})
    assert not applied
    # glibc's defaults mmap the block afresh and unmap it on free: measured 64 MiB (the whole block) per reuse
    assert grown >= BLOCK // 2, f"only {grown} bytes per 64 MB block with glibc's defaults; the test lost its contrast"


def test_only_cpu_runs_are_tuned(monkeypatch):
    from flax_gpt import host_memory

    assert host_memory.jax_runs_on_cpu("cpu") and not host_memory.jax_runs_on_cpu("cuda")
    monkeypatch.setattr(host_memory, "ACCELERATOR_PLUGINS", ("no-such-plugin",))
    assert host_memory.jax_runs_on_cpu("auto")
    monkeypatch.setattr(host_memory, "ACCELERATOR_PLUGINS", ("no-such-plugin", "numpy"))  # installed: stands for one
    assert not host_memory.jax_runs_on_cpu("auto")
