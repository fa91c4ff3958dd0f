"""--remat's train step two ways, side by side in one process: autodiff of GPT.loss with jax.checkpoint blocks
(the train step before flax_gpt.remat) and flax_gpt.remat's own backward pass (the train step now).

    python benchmarks/remat_ab.py --preset gpt2 --batch-size 4 --seq-len 1024 --dtype bfloat16 --steps 4

Both are compiled first, then step in turn (the order alternating); prints median ms per step and new / old.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt import GPT, optim, preset, remat, train_step
from flax_gpt.host_memory import keep_freed_memory

VARIANTS = {"old (jax.checkpoint + autodiff)": jax.value_and_grad(train_step.loss_fn),
            "new (flax_gpt.remat)": remat.loss_and_grads}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each variant")
    args = ap.parse_args()
    keep_freed_memory()  # as train.py on the CPU
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.integers(0, 50257, (1, args.batch_size, args.seq_len)), jnp.int32) for _ in range(2))
    tx = optim.make_optimizer(optim.OptimConfig())
    runs = {}
    for name, grad_fn in VARIANTS.items():
        train_step.loss_and_grads = grad_fn  # what make_train_step compiles
        graphdef, state = train_step.init_state(GPT(preset(args.preset, dtype=args.dtype, remat=True), seed=0), tx)
        step = train_step.make_train_step(graphdef, tx)
        state, metrics = step(state, x, y)  # compile and first step
        runs[name] = {"step": step, "state": state, "ms": [], "loss": float(metrics["loss"])}
    for i in range(args.steps):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            r = runs[name]
            start = time.perf_counter()
            r["state"], metrics = r["step"](r["state"], x, y)
            jax.block_until_ready(metrics)
            r["ms"].append((time.perf_counter() - start) * 1e3)
            r["loss"] = float(metrics["loss"])
    medians = [statistics.median(r["ms"]) for r in runs.values()]
    print(f"{args.preset} {args.batch_size}x{args.seq_len} {args.dtype} --remat, median ms per step of {args.steps}:")
    for (name, r), ms in zip(runs.items(), medians):
        print(f"  {name}: {ms:.0f} ms, last loss {r['loss']:.5f}")
    print(f"new / old time: {medians[1] / medians[0]:.3f}")


if __name__ == "__main__":
    main()
