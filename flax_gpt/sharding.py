"""Data-parallel and FSDP training on JAX's own SPMD sharding, one process or many.

One mesh axis, "data", spans every device of every process. Batches are split along it.
Under "dp" the parameters and optimizer state are replicated; under "fsdp" each large
array is split along its largest dimension divisible by the device count, by a rule on
shapes alone, so AdamW's moments are sharded exactly like the parameters they belong to.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_gpt.errors import UserError

Strategy = Literal["auto", "none", "dp", "fsdp"]
AXIS = "data"
FSDP_MIN_SIZE = 2**14  # arrays smaller than this (biases, LayerNorms) stay replicated


def initialize_distributed() -> None:
    """Start JAX's multi-process runtime when launched as one of several processes.

    Reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (all three, or none:
    then JAX's own cluster detection, e.g. SLURM, is tried only if FLAX_GPT_DISTRIBUTED=1).
    """
    env = {k: os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    if all(env.values()):
        try:
            n, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise UserError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives between processes
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=pid)
    elif any(env.values()):
        missing = [k for k, v in env.items() if not v]
        raise UserError(f"multi-process launch needs JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; "
                        f"missing {', '.join(missing)}")
    elif os.environ.get("FLAX_GPT_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # cluster auto-detection (SLURM, Open MPI, ...)


def resolve_strategy(strategy: Strategy) -> str:
    """auto: dp when more than one device is visible, else none."""
    if strategy not in ("auto", "none", "dp", "fsdp"):
        raise UserError(f"--sharding must be auto, none, dp or fsdp, got {strategy!r}")
    if strategy == "auto":
        return "dp" if jax.device_count() > 1 else "none"
    return strategy


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), (AXIS,))


def param_spec(shape: tuple[int, ...], n_devices: int, strategy: str) -> P:
    """FSDP's rule: shard the largest dimension divisible by the device count; else replicate."""
    if strategy != "fsdp" or n_devices == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % n_devices == 0:
            spec = [None] * len(shape)
            spec[d] = AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh, strategy: str):
    """NamedShardings for every leaf of the train state (params, optimizer state, step)."""
    n = mesh.devices.size
    return jax.tree.map(lambda a: NamedSharding(mesh, param_spec(tuple(a.shape), n, strategy)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(A, B, T) micro-batched tokens: the batch axis B split over the devices."""
    return NamedSharding(mesh, P(None, AXIS, None))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of the mesh (scalars such as the loss and metrics)."""
    return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows (A, B_local, T) as its part of the global (A, B_local * processes, T) array."""
    return jax.make_array_from_process_local_data(sharding, local)


def check_batch_divides(batch_size: int, process_count: int, local_devices: int) -> None:
    """Each process's micro batch must split evenly over its devices."""
    if batch_size % local_devices:
        raise UserError(f"--batch-size {batch_size} (per process) is not divisible by this process's "
                        f"{local_devices} devices; use a multiple of {local_devices}")
