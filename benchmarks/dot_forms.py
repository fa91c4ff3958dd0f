"""Each form of dot the CPU train step makes, timed alone in JAX and in torch, with the kernel XLA:CPU gives it
(ynn: a YNNPACK fusion, XLA:CPU's fast path; dot: XLA's own loop). Which forms reach a CPU's fast units (AVX-512
BF16, AMX) differs by CPU and by form; this is the table to read on a new host kind.

    python benchmarks/dot_forms.py                   # the small preset's shapes, B=8, T=256
    python benchmarks/dot_forms.py --json forms.json

Forms: nn (x @ w), nt (x @ w.T, the lm_head), tn (x.T @ g, every weight gradient), batched nt and nn (attention's
scores and output, heads leading). Dtypes: fp32; bf16 inputs with float32 results (the model's matmuls); bf16 in
and out (torch's bf16 matmul, the form XLA:CPU upcasts).
"""

from __future__ import annotations

import argparse
import json
import re
import time

from flax_gpt.devices import cpu_info, cpu_line

DTYPES = {"fp32": ("float32", "float32"), "bf16->f32": ("bfloat16", "float32"), "bf16": ("bfloat16", "bfloat16")}


def forms(tokens: int, C: int, vocab: int, B: int, H: int, T: int) -> dict[str, tuple[str, tuple, tuple]]:
    """name -> (einsum, lhs shape, rhs shape) of the step's dots."""
    D = C // H
    return {"c_fc x @ w (nn)": ("nk,km->nm", (tokens, C), (C, 4 * C)),
            "c_fc dx = g @ w.T (nt)": ("nm,km->nk", (tokens, 4 * C), (C, 4 * C)),
            "c_fc dw = x.T @ g (tn)": ("nk,nm->km", (tokens, C), (tokens, 4 * C)),
            "lm_head x @ wte.T (nt)": ("nk,vk->nv", (tokens, C), (vocab, C)),
            "attention q @ k.T (batched nt)": ("bqd,bkd->bqk", (B * H, T, D), (B * H, T, D)),
            "attention p @ v (batched nn)": ("bqk,bkd->bqd", (B * H, T, T), (B * H, T, D))}


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def flops(equation: str, lhs: tuple, rhs: tuple) -> float:
    """2 x output elements x contracted length."""
    sizes = dict(zip(equation.split("->")[0].replace(",", ""), lhs + rhs))
    out = equation.split("->")[1]
    contracted = set(equation.split("->")[0].replace(",", "")) - set(out)
    n = 2.0
    for axis in set(out) | contracted:
        n *= sizes[axis]
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rows = []
    shapes = forms(args.batch_size * args.seq_len, args.n_embd, 50304, args.batch_size, args.n_head, args.seq_len)
    for name, (equation, lhs, rhs) in shapes.items():
        for label, (dtype, out) in DTYPES.items():
            a, b = (jnp.asarray(np.random.default_rng(i).standard_normal(s), dtype) for i, s in enumerate((lhs, rhs)))
            fn = jax.jit(lambda x, y, eq=equation, o=out: jnp.einsum(eq, x, y, preferred_element_type=o))
            hlo = fn.lower(a, b).compile().as_text()
            kernel = "ynn" if "__ynn_fusion" in hlo else ("dot" if re.search(r"\bdot\(", hlo) else "other")
            jax_s = best_seconds(lambda: fn(a, b).block_until_ready(), args.repeats)
            ta, tb = (torch.from_numpy(np.asarray(t, np.float32)).to(getattr(torch, dtype)) for t in (a, b))
            torch_s = best_seconds(lambda: torch.einsum(equation, ta, tb), args.repeats) if out == dtype else None
            n = flops(equation, lhs, rhs)
            rows.append({"form": name, "dtype": label, "xla_kernel": kernel, "jax_gflops": n / jax_s / 1e9,
                         "torch_gflops": n / torch_s / 1e9 if torch_s else None})
            print(rows[-1], flush=True)
    cpu = cpu_info()
    header = (f"{cpu_line(cpu)}, {torch.get_num_threads()} torch threads; "
              f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"\n{header}\n\n| form | dtype | XLA kernel | jax GFLOP/s | torch GFLOP/s | jax / torch |\n"
          "| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        theirs = f"{r['torch_gflops']:.0f} | {r['jax_gflops'] / r['torch_gflops']:.2f}x" if r["torch_gflops"] else "- | -"
        print(f"| {r['form']} | {r['dtype']} | {r['xla_kernel']} | {r['jax_gflops']:.0f} | {theirs} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "cpu": cpu, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
