"""keep_freed_memory: a freed 64 MB block is reused without faulting its pages in again; CPU runs only."""

import os
import subprocess
import sys

import pytest

from flax_gpt.host_memory import OPT_OUT

FAULTS_PER_REUSE = """
import ctypes, resource
from flax_gpt.host_memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20  # 16384 pages of 4 KiB

def touch_and_free():
    block = libc.malloc(ctypes.c_size_t(size))
    ctypes.memset(block, 1, size)  # fault every page in
    libc.free(ctypes.c_void_p(block))

touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch_and_free()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def faults_per_reuse(env_extra: dict) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT} | env_extra
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_REUSE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = faults_per_reuse({})
    assert applied
    assert faults < 100, f"{faults} page faults per reuse of a 64 MB block (16384 pages); expected ~0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_opt_out_leaves_malloc_alone():
    applied, faults = faults_per_reuse({OPT_OUT: "1"})
    assert not applied
    assert faults > 10000, f"only {faults} page faults per 64 MB block with glibc's defaults; the test lost its contrast"


def test_only_cpu_runs_are_tuned(monkeypatch):
    from flax_gpt import host_memory

    assert host_memory.jax_runs_on_cpu("cpu") and not host_memory.jax_runs_on_cpu("cuda")
    monkeypatch.setattr(host_memory, "ACCELERATOR_PLUGINS", ("no-such-plugin",))
    assert host_memory.jax_runs_on_cpu("auto")
    monkeypatch.setattr(host_memory, "ACCELERATOR_PLUGINS", ("no-such-plugin", "numpy"))  # installed: stands for one
    assert not host_memory.jax_runs_on_cpu("auto")
