"""Memory of training: per-device params + AdamW state under FSDP, and what remat saves.

    python benchmarks/memory.py --preset gpt2-xl --devices 1 2 4 8 16 --remat-preset gpt2 --batch 4 --seq-len 1024

(1) bytes per device of the train state (fp32 params, AdamW mu and nu) when sharded by
flax_gpt.sharding's FSDP rule over N devices, from abstract shapes (nothing is allocated);
(2) XLA's compiled temp memory (activations) of one train step with and without remat.
"""

import argparse
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flax_gpt import GPT, preset
from flax_gpt.optim import OptimConfig, lr_schedule, make_optimizer
from flax_gpt.sharding import param_spec
from flax_gpt.train_step import init_state, make_train_step


def abstract_state(config):
    tx = make_optimizer(OptimConfig())
    return nnx.eval_shape(lambda: init_state(GPT(config), tx)[1]), tx


def per_device_bytes(state, n_devices: int, strategy: str) -> int:
    """Bytes one device holds: a sharded dimension is divided by the device count."""
    total = 0
    for leaf in jax.tree.leaves(state):
        spec = param_spec(tuple(leaf.shape), n_devices, strategy)
        shards = n_devices if any(s is not None for s in spec) else 1
        total += math.prod(leaf.shape) * leaf.dtype.itemsize // shards
    return total


def step_temp_bytes(config, batch: int, seq_len: int) -> int:
    """XLA's temp allocation (activations, gradients in flight) of one compiled train step."""
    state, tx = abstract_state(config)
    graphdef = nnx.split(nnx.eval_shape(lambda: GPT(config)), nnx.Param)[0]
    step = make_train_step(graphdef, tx, lr_schedule(OptimConfig()))
    x = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    return step.lower(state, x, x).compile().memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-xl")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--remat-preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    state, _ = abstract_state(preset(args.preset))
    rows = [{"devices": n, "dp_GiB": per_device_bytes(state, n, "dp") / 2**30,
             "fsdp_GiB": per_device_bytes(state, n, "fsdp") / 2**30} for n in args.devices]
    print(f"{args.preset}: fp32 params + AdamW mu, nu per device")
    print("| devices | dp GiB/device | fsdp GiB/device |\n| ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['devices']} | {r['dp_GiB']:.2f} | {r['fsdp_GiB']:.2f} |")
    remat = {}
    for flag in (False, True):
        remat[flag] = step_temp_bytes(preset(args.remat_preset, remat=flag), args.batch, args.seq_len) / 2**30
    print(f"\n{args.remat_preset}, B={args.batch}, T={args.seq_len}, fp32, {jax.devices()[0].platform}: XLA temp memory "
          f"of one train step: {remat[False]:.2f} GiB without remat, {remat[True]:.2f} GiB with remat")
    print(json.dumps({"state": rows, "remat_temp_GiB": {"off": remat[False], "on": remat[True]}}))


if __name__ == "__main__":
    main()
