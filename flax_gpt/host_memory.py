"""Reuse freed host memory: XLA:CPU allocates a step's temporaries (gigabytes for gpt2) afresh on every
call, and glibc's malloc maps them anew each time, so every page is faulted in and zeroed again."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt parameters, glibc's malloc.h
OPT_OUT = "FLAX_GPT_DEFAULT_MALLOC"  # set to 1 to leave malloc as it is
ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm60-plugin", "libtpu", "jax-mps")


def jax_runs_on_cpu(device: str) -> bool:
    """Whether train.py's --device will be the CPU: asked for, or auto with no accelerator plugin installed."""
    if device != "auto":
        return device == "cpu"
    for name in ACCELERATOR_PLUGINS:
        try:
            importlib.metadata.distribution(name)
            return False
        except importlib.metadata.PackageNotFoundError:
            pass
    return True


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (whose mallopt takes the settings below), else None."""
    if not sys.platform.startswith("linux"):  # CDLL(None) is the process's own symbols only on ELF systems
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl and others: no such mallopt


def keep_freed_memory() -> bool:
    """glibc only: one arena, no mmap for big blocks, no trimming, so freed blocks are reused in place.

    Steps then fault no pages in and run faster on the CPU (measured: a gpt2 bf16 step at B=4, T=256 went from
    2.10 to 1.57 s; XLA's 1.9 GB temp buffer had been mapped and faulted in afresh every step). The cost is host
    memory: what one phase frees (eval, sampling, checkpointing) stays with the process, so a run's peak RSS
    is higher. Only worth it when XLA computes on the CPU. Call it before JAX starts its threads; True if applied.
    """
    libc = glibc()
    if libc is None or os.environ.get(OPT_OUT) == "1":
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
