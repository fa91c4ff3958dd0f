"""Throughput and MFU, the per-step metrics file, and the loss-curve picture."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt.config import GPTConfig

# Dense bf16 datasheet peaks (FLOP/s) by device-kind substring; fp32 without TF32 is far lower.
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                 "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate: 6N + 12 L H Q T (N without wpe)."""
    L, H, Q, T = config.n_layer, config.n_head, config.head_dim, seq_len
    return 6 * n_params + 12 * L * H * Q * T


def measured_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted n x n matmul, done as the model does it in `dtype`: the CPU's practical peak."""
    from flax_gpt.model import matmul as model_matmul  # bf16: bf16 x bf16 -> f32, the fast kernels

    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: model_matmul(x, x, dtype))
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        for name, peak in GPU_PEAK_BF16.items():
            if name in device.device_kind:
                return peak, f"{name} datasheet bf16"
    return measured_matmul_peak(dtype), f"measured {dtype} matmul on {device.platform}"


class MetricsLog:
    """One JSON object per line in OUT_DIR/metrics.jsonl; a resumed run drops steps it will redo."""

    def __init__(self, path: Path, resume_from_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled  # only one process of a multi-process run writes
        if not enabled:
            return
        if resume_from_step is None:
            path.write_text("")
        elif path.exists():  # a killed run may have left half a line at the end: it goes with the redone steps
            kept = [line for line in path.read_text().splitlines() if _step_of(line) < resume_from_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)  # a crash now leaves the old file or the new one, never a cut one

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

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


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """Train loss (raw and smoothed) and val loss against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = map(np.asarray, zip(*train))
        k = max(1, len(losses) // 25)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3 if k > 1 else 1.0, linewidth=0.8, label="train")
        if k > 1:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, color="tab:blue", linewidth=1.6, label=f"train (mean of {k})")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.6, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
