"""Memory of training, from XLA's own analysis of compiled programs (compile only: nothing is allocated,
so GPU-sized shapes are measured on the CPU).

    python benchmarks/memory.py                       # every table below, gpt2 at T=1024
    python benchmarks/memory.py --json memory.json

(1) XLA's temp memory of one gpt2 train step (activations, gradients, optimizer temporaries) at B=8,
    fp32 and bf16, with and without remat, and the goals' ratios; and per sequence (the step at 2B
    minus the step at B, over B): what grows with the batch, without the fixed part (gradients, AdamW
    temporaries, one chunk of the loss);
(2) the lm_head + loss term alone: the full (B, T, V) float32 logits with plain autodiff, against
    flax_gpt.ops.lm_head_loss's chunks;
(3) whether the gpt2 run preset's micro batch fits one 80 GB GPU in bf16: the step's temp memory plus
    its arguments (parameters, AdamW state, batch), with the XLA attention (an upper bound for cuDNN's);
(4) bytes per device of the gpt2-xl train state under dp and FSDP (from shapes alone).
"""

import argparse
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flax_gpt import GPT, ops, preset
from flax_gpt.optim import OptimConfig, lr_schedule, make_optimizer
from flax_gpt.sharding import param_spec
from flax_gpt.run_config import RUN_PRESETS
from flax_gpt.train_step import init_state, make_train_step

GiB = 2**30
GPU_BYTES = 80e9  # an 80 GB H100 / A100


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


def compiled_step(config, batch: int, seq_len: int):
    """The train step compiled for one (1, batch, seq_len) micro batch, on abstract shapes."""
    state, tx = abstract_state(config)
    graphdef = nnx.split(nnx.eval_shape(lambda: GPT(config)), nnx.Param)[0]
    step = make_train_step(graphdef, tx, lr_schedule(OptimConfig()))
    x = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    return step.lower(state, x, x).compile()


def step_temp_bytes(config, batch: int, seq_len: int) -> int:
    """XLA's temp allocation (activations, gradients in flight) of one compiled train step."""
    return compiled_step(config, batch, seq_len).memory_analysis().temp_size_in_bytes


def loss_temp_bytes(config, batch: int, seq_len: int, chunked: bool) -> int:
    """Temp memory of the lm_head + loss alone (value and gradients of the final activations and wte)."""
    x = jax.ShapeDtypeStruct((batch, seq_len, config.n_embd), jnp.float32)
    wte = jax.ShapeDtypeStruct((config.padded_vocab_size, config.n_embd), jnp.float32)
    y = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    V = config.vocab_size

    def plain(x, wte, y):  # the model's forward without the trunk: (B, T, Vp) float32 logits, plain autodiff
        return ops.cross_entropy(ops.tied_logits(x, wte, V, config.dtype), y)

    def chunks(x, wte, y):
        return ops.lm_head_loss(x, wte, y, V, config.dtype)

    fn = jax.jit(jax.value_and_grad(chunks if chunked else plain, argnums=(0, 1)))
    return fn.lower(x, wte, y).compile().memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--state-preset", default="gpt2-xl")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    B, T, out = args.batch, args.seq_len, {}
    where = f"{jax.devices()[0].platform}, jax {jax.__version__}"

    temp, per_seq = {}, {}
    for dtype in ("float32", "bfloat16"):
        for remat in (False, True):
            at_B, at_2B = (step_temp_bytes(preset("gpt2", dtype=dtype, remat=remat), b, T) / GiB for b in (B, 2 * B))
            temp[dtype, remat], per_seq[dtype, remat] = at_B, (at_2B - at_B) / B
    print(f"(1) gpt2 train step, T={T}, XLA temp memory ({where})\n")
    print(f"| dtype | B={B} GiB | B={B} remat GiB | remat / no remat | per sequence MiB | per sequence remat MiB | "
          "remat / no remat |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in ("float32", "bfloat16"):
        print(f"| {d} | {temp[d, False]:.2f} | {temp[d, True]:.2f} | {temp[d, True] / temp[d, False]:.2f} | "
              f"{per_seq[d, False] * 1024:.0f} | {per_seq[d, True] * 1024:.0f} | {per_seq[d, True] / per_seq[d, False]:.2f} |")
    ratios = {"bf16_vs_fp32": temp["bfloat16", False] / temp["float32", False],
              "bf16_remat_vs_bf16": temp["bfloat16", True] / temp["bfloat16", False],
              "per_seq_bf16_vs_fp32": per_seq["bfloat16", False] / per_seq["float32", False],
              "per_seq_bf16_remat_vs_bf16": per_seq["bfloat16", True] / per_seq["bfloat16", False]}
    print(f"\nbf16 / fp32 at B={B}: {ratios['bf16_vs_fp32']:.3f}, per sequence {ratios['per_seq_bf16_vs_fp32']:.3f} "
          f"(goal <= 0.6); bf16 remat / no remat at B={B}: {ratios['bf16_remat_vs_bf16']:.3f}, per sequence "
          f"{ratios['per_seq_bf16_remat_vs_bf16']:.3f} (goal <= 0.3)")
    out["step_temp_GiB"] = {f"{d}{'_remat' if r else ''}": v for (d, r), v in temp.items()}
    out["per_sequence_GiB"] = {f"{d}{'_remat' if r else ''}": v for (d, r), v in per_seq.items()}
    out["ratios"] = ratios

    loss = {chunked: loss_temp_bytes(preset("gpt2"), B, T, chunked) / GiB for chunked in (False, True)}
    logits_GiB = B * T * preset("gpt2").padded_vocab_size * 4 / GiB
    print(f"\n(2) lm_head + loss alone, B={B}, T={T}, fp32: (B, T, Vp) float32 logits are {logits_GiB:.2f} GiB; "
          f"temp memory of value + gradients: full logits {loss[False]:.2f} GiB, "
          f"chunks of {ops.LOSS_CHUNK} tokens {loss[True]:.2f} GiB")
    out["loss_temp_GiB"] = {"full_logits": loss[False], "chunked": loss[True], "logits_tensor": logits_GiB}

    run = RUN_PRESETS["gpt2"]
    compiled = compiled_step(preset("gpt2", dtype="bfloat16"), run.batch_size, run.seq_len)
    mem = compiled.memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes
    print(f"\n(3) the gpt2 run preset's micro batch, {run.batch_size}x{run.seq_len}, bf16, XLA attention: temp "
          f"{mem.temp_size_in_bytes / GiB:.2f} GiB + arguments (params, AdamW state, batch) "
          f"{mem.argument_size_in_bytes / GiB:.2f} GiB = {total / GiB:.2f} GiB of {GPU_BYTES / GiB:.1f} GiB: "
          f"{'fits' if total < GPU_BYTES else 'does NOT fit'}")
    out["gpt2_preset"] = {"batch": run.batch_size, "seq_len": run.seq_len, "temp_GiB": mem.temp_size_in_bytes / GiB,
                          "arguments_GiB": mem.argument_size_in_bytes / GiB, "fits_80GB": total < GPU_BYTES}

    state, _ = abstract_state(preset(args.state_preset))
    rows = [{"devices": n, "dp_GiB": per_device_bytes(state, n, "dp") / GiB,
             "fsdp_GiB": per_device_bytes(state, n, "fsdp") / GiB} for n in args.devices]
    print(f"\n(4) {args.state_preset}: fp32 params + AdamW mu, nu per device\n")
    print("| devices | dp GiB/device | fsdp GiB/device |\n| ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['devices']} | {r['dp_GiB']:.2f} | {r['fsdp_GiB']:.2f} |")
    out["state"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
