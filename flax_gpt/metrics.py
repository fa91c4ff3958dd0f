"""Throughput and MFU, and the per-step metrics file (metrics.jsonl) with the sinks that get the same records."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_gpt.config import GPTConfig
from flax_gpt.files import atomic_write
from flax_gpt.ops import matmul as model_matmul  # the model's matmul: bf16 x bf16 -> f32, the fast kernels

# Dense bf16 datasheet peaks (FLOP/s, no sparsity, float32 accumulation) by the exact `device_kind` JAX reports,
# which is the CUDA device name (what nvidia-smi shows). A kind not listed gets no MFU: a near name can be another
# chip (an L40 is not an L4). V100 and T4 are absent on purpose: they have no bf16 tensor cores. As in nanoGPT's
# estimate_mfu, MFU on a GPU is against this peak whatever the compute dtype.
GPU_PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM (an H200 NVL, 835e12, may report the same name)
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A10": 125e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA GeForce RTX 4090": 165e12,
    "NVIDIA GeForce RTX 3090": 71e12,
}


def params_without_wpe(params, config: GPTConfig) -> int:
    """The N of flops_per_token: every parameter but the position embeddings (a lookup, no matmul)."""
    return sum(x.size for x in jax.tree.leaves(params)) - config.block_size * config.n_embd


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate: 6N + 12 L H Q T (N without wpe)."""
    L, H, Q, T = config.n_layer, config.n_head, config.head_dim, seq_len
    return 6 * n_params + 12 * L * H * Q * T


def measured_matmul_peak(dtype: str = "float32", devices=None, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n matmul split by rows over `devices` (default: the first), done as the model does
    it in `dtype`: the practical peak of those devices together (forced CPU devices share the same cores)."""
    devices = list(devices or jax.devices()[:1])
    rows = n // len(devices) * len(devices)
    mesh = Mesh(np.array(devices), ("rows",))
    a = jax.device_put(jnp.ones((rows, n), dtype), NamedSharding(mesh, P("rows", None)))  # (rows, n) split
    b = jax.device_put(jnp.ones((n, n), dtype), NamedSharding(mesh, P()))  # (n, n) on every device
    matmul = jax.jit(lambda x, w: model_matmul(x, w, dtype))
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * n * n / best


def peak_flops(dtype: str, devices, processes: int = 1) -> tuple[float | None, str]:
    """(peak FLOP/s of all the devices a step runs on, where the figure comes from); None where it is unknown.

    devices: this process's devices that run the step; every one of `processes` processes runs as many. On CPU
    the peak is measured over those devices together; on GPUs it is the datasheet bf16 peak of each, summed.
    """
    devices = list(devices)
    platform = devices[0].platform
    if platform == "cpu":
        peak = measured_matmul_peak(dtype, devices) * processes
        each = f" in each of {processes} processes" if processes > 1 else ""
        return peak, f"measured {dtype} matmul over {len(devices)} cpu devices{each}"
    kinds = sorted({d.device_kind for d in devices})
    unknown = [k for k in kinds if k not in GPU_PEAK_BF16] if platform == "gpu" else kinds
    if unknown:
        return None, f"no datasheet peak for {platform} device kind {unknown[0]!r} (flax_gpt/metrics.py GPU_PEAK_BF16)"
    total = sum(GPU_PEAK_BF16[d.device_kind] for d in devices) * processes
    return total, f"{len(devices) * processes} x {' / '.join(kinds)} datasheet bf16"


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over the peak of the devices that ran them; None without a peak."""
    return None if peak is None else flops_per_s / peak


def peak_device_memory_gib() -> float | None:
    """The most memory any local device has held so far, in GiB, where the platform reports it (CUDA); else None."""
    stats = [device.memory_stats() or {} for device in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) / 2**30 if peaks else None


class MetricsLog:
    """One JSON object per line in OUT_DIR/metrics.jsonl; a resumed run drops steps it will redo.

    sinks: objects with write(record) and close() (flax_gpt.sinks: TensorBoard, W&B) that get every record too.
    """

    def __init__(self, path: Path, resume_from_step: int | None = None, enabled: bool = True, sinks=()):
        self.path, self.enabled = path, enabled  # only one process of a multi-process run writes
        self.sinks = list(sinks) if enabled else []
        if not enabled:
            return
        if resume_from_step is None:
            path.write_text("")
        elif path.exists():  # a killed run may have left half a line at the end: it goes with the redone steps
            kept = [line for line in path.read_text().splitlines() if _step_of(line) < resume_from_step]
            atomic_write(path, "".join(line + "\n" for line in kept))  # a crash leaves the old file or the new one

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Flush and close the sinks (the file is closed after every record)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def read(self) -> list[dict]:
        if not self.enabled:
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a blank or half-written one."""
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf
