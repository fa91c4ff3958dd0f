"""Time to compile a jitted forward+backward for GPT-2 shapes, layers unrolled (the default) and rolled.

    python benchmarks/compile_time.py --presets gpt2 gpt2-xl --seq-len 1024

Unrolled, compile time grows with depth; `scan_layers=True` keeps it flat.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from flax_gpt import GPT, preset
from flax_gpt.devices import attention_implementation


def compile_seconds(name: str, batch: int, seq_len: int, dtype: str, scan_layers: bool, attention: str = "xla") -> dict:
    """Lower and compile grad(loss) on abstract shapes (no weights are allocated)."""
    config = preset(name, dtype=dtype, scan_layers=scan_layers, attention=attention)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: GPT(config)), nnx.Param)
    idx = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def loss_fn(p, x, y):
        return nnx.merge(graphdef, p)(x, y)[1]

    t0 = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss_fn)).lower(params, idx, idx)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"preset": name, "n_layer": config.n_layer, "scan_layers": scan_layers, "attention": attention,
            "trace_lower_s": round(t1 - t0, 2),
            "compile_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["gpt2", "gpt2-xl"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", choices=["auto", "xla", "tiled"], default="auto", help="auto: what train.py takes")
    ap.add_argument("--rolled", choices=["both", "no", "yes"], default="both", help="which layer loops to compile")
    args = ap.parse_args()
    attention = attention_implementation(args.attention, jax.default_backend(), args.dtype,
                                         train_seq_len=args.seq_len)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, B={args.batch}, T={args.seq_len}, {args.dtype}")
    for scan_layers in {"both": (False, True), "no": (False,), "yes": (True,)}[args.rolled]:
        for name in args.presets:
            print(json.dumps(compile_seconds(name, args.batch, args.seq_len, args.dtype, scan_layers, attention)),
                  flush=True)


if __name__ == "__main__":
    main()
