"""The cost per step of Muon against AdamW on the gpt2 preset's shapes: `python benchmarks/optimizer_cost.py`.

    python benchmarks/optimizer_cost.py --json benchmarks/results/optimizer_cost.json
    python benchmarks/optimizer_cost.py --no-gpu            # the CPU timing and the analytic FLOPs only
    python benchmarks/optimizer_cost.py --no-train-step     # the update programs only (no whole-step compiles)

The program measured is the optimizer update alone, (grads, opt_state, params) -> (params, opt_state):
tx.update + optax.apply_updates of make_optimizer(OptimConfig()) (AdamW) and make_optimizer(OptimConfig(
optimizer="muon")) (Muon on the blocks' 2-D kernels, AdamW on the rest), clipping included.
(a) CPU: milliseconds per update, jitted, on real arrays (the state donated and carried from one call to the
    next), the median of --repeats calls after a warm-up, the two optimizers interleaved; with the machine's cores.
(b) Analytic: the Newton-Schulz matmul FLOPs (per (m, n) matrix, m <= n: steps x (2m^2n [X X^T] + 2m^3 [A A] +
    2m^2n [B X])) against the train step's 6N x tokens (N without wpe, gpt2 preset's 524,288 tokens).
(c) H100, compiled without a GPU as benchmarks/cuda_compile.py compiles (its device description, its memory and
    cost figures via benchmarks/hlo_cost.py, its roofline at the bf16 peak): the two update programs and, unless
    --no-train-step, the whole gpt2 train step (cuDNN attention, 64x8 micro batches) with each optimizer. These
    are compiled predictions: nothing runs on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # as benchmarks/cuda_compile.py: the CUDA plugin on the path, JAX itself on the CPU
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path[1:1] = [str(Path(os.environ.get("FLAX_GPT_CUDA_AOT", Path(sys.prefix) / "cuda-aot"))), str(ROOT)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_compile  # noqa: E402

from flax_gpt import GPT, preset  # noqa: E402
from flax_gpt.devices import cpu_info  # noqa: E402
from flax_gpt.metrics import flops_per_token, params_without_wpe  # noqa: E402
from flax_gpt.muon import NS_STEPS  # noqa: E402
from flax_gpt.optim import OptimConfig, make_optimizer, muon_labels  # noqa: E402
from flax_gpt.run_config import RUN_PRESETS  # noqa: E402

OPTIMIZERS = ("adamw", "muon")
GiB = 2**30


def optimizer(name: str) -> optax.GradientTransformation:
    return make_optimizer(OptimConfig(optimizer=name))


def update_program(tx: optax.GradientTransformation):
    """The jitted update (grads, opt_state, params) -> (params, opt_state); opt_state and params donated."""
    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(update, donate_argnums=(1, 2))


def cpu_times(config, repeats: int) -> dict:
    """{optimizer: {"ms": median ms per update, "runs_ms", "compile_s"}} on this machine's CPU, real arrays."""
    params = nnx.state(GPT(config, seed=0), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = treedef.unflatten([1e-3 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
    runs, state = {}, {}
    for name in OPTIMIZERS:
        tx = optimizer(name)
        fn = update_program(tx)
        own = jax.tree.map(jnp.copy, params)  # each optimizer its own params: the update donates them
        t0 = time.perf_counter()
        compiled = fn.lower(grads, tx.init(own), own).compile()
        compile_s = time.perf_counter() - t0
        p, s = compiled(grads, tx.init(own), own)  # warm-up
        jax.block_until_ready((p, s))
        state[name] = dict(fn=compiled, carry=(s, p), compile_s=compile_s)
        runs[name] = []
    for _ in range(repeats):  # interleaved, so that other work on the machine weighs on both alike
        for name in OPTIMIZERS:
            st = state[name]
            t0 = time.perf_counter()
            p, s = st["fn"](grads, *st["carry"])
            jax.block_until_ready((p, s))
            runs[name].append((time.perf_counter() - t0) * 1e3)
            st["carry"] = (s, p)
    return {name: {"ms": statistics.median(runs[name]), "runs_ms": [round(t, 1) for t in runs[name]],
                   "compile_s": round(state[name]["compile_s"], 1)} for name in OPTIMIZERS}


def newton_schulz_flops(params, steps: int = NS_STEPS) -> dict:
    """Analytic FLOPs of one Muon step's Newton-Schulz iterations over the Muon-labelled kernels: the matmuls, and
    the small terms (the norm, b*A + c*AA and a*X + BX, elementwise)."""
    labels = muon_labels(params)
    matmul = small = 0
    matrices = []
    for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        if label != "muon":
            continue
        count = 1
        for d in p.shape[:-2]:
            count *= d
        m, n = sorted(p.shape[-2:])
        matmul += count * steps * (2 * m * m * n + 2 * m**3 + 2 * m * m * n)
        small += count * (3 * m * n + steps * (3 * m * m + 2 * m * n))
        matrices.append([list(p.shape), count])
    return {"matmul": matmul, "small": small, "matrices": matrices}


def compiled_rows(config, train_step: bool) -> list[dict]:
    """The update programs (and the whole train steps) compiled for an H100, as cuda_compile measures them."""
    target = cuda_compile.TARGETS["h100"]
    device = cuda_compile.gpu_device(target)
    params = nnx.state(nnx.eval_shape(lambda: GPT(config)), nnx.Param)
    rows = []
    for name in OPTIMIZERS:
        tx = optimizer(name)
        args = cuda_compile.on(device, (params, jax.eval_shape(tx.init, params), params))
        row = cuda_compile.measure(target, update_program(tx), args, "bfloat16")
        rows.append({"program": "update", "optimizer": name, "target": target.name, "device": device.device_kind,
                     **row})
        print(f"compiled h100 update {name}: {row['compile_s']} s", file=sys.stderr, flush=True)
    if train_step:
        cuda_compile.cudnn_stand_in()
        run = RUN_PRESETS["gpt2"]
        for name in OPTIMIZERS:
            row = cuda_compile.compile_row(target, device, "train_step", "bfloat16", "cudnn", False, target.micro_batch,
                                           run.total_batch_size // (target.micro_batch * run.seq_len), optimizer=name)
            rows.append(row)
            print(cuda_compile.summary(row), file=sys.stderr, flush=True)
    return rows


def markdown(results: dict) -> str:
    """The results as the tables printed."""
    a = results["analytic"]
    lines = [f"CPU: {results['cpu']} ({results['cpu_threads']} threads, load average {results['load_average'][0]:.1f}"
             f" -> {results['load_average'][1]:.1f}); jax {results['jax']}; commit {results['commit']}", ""]
    if results.get("cpu_ms"):
        c = results["cpu_ms"]
        lines += ["| optimizer | CPU ms per update (median) | runs ms | compile s |", "| --- | ---: | --- | ---: |"]
        lines += [f"| {k} | {v['ms']:.0f} | {', '.join(f'{t:.0f}' for t in v['runs_ms'])} | {v['compile_s']} |"
                  for k, v in c.items()]
        lines += ["", f"CPU muon / adamw: {c['muon']['ms'] / c['adamw']['ms']:.1f}x; Newton-Schulz matmuls at "
                  f"{a['ns_matmul_flops'] / (c['muon']['ms'] / 1e3) / 1e9:.0f} GFLOP/s over the whole muon update", ""]
    lines += ["| analytic | FLOPs | of 6N x tokens |", "| --- | ---: | ---: |",
              f"| Newton-Schulz matmuls ({NS_STEPS} steps, {a['muon_matrices']} matrices) | "
              f"{a['ns_matmul_flops'] / 1e12:.3f} T | {a['ns_matmul_flops'] / a['train_6n_flops']:.3%} |",
              f"| Newton-Schulz small terms | {a['ns_small_flops'] / 1e9:.2f} G | "
              f"{a['ns_small_flops'] / a['train_6n_flops']:.4%} |",
              f"| train step 6N x tokens (N={a['n_without_wpe']:,}, {a['tokens']:,} tokens) | "
              f"{a['train_6n_flops'] / 1e12:.1f} T | 100% |",
              f"| train step 6N + 12LHQT per token (nanoGPT) | {a['train_model_flops'] / 1e12:.1f} T | "
              f"{a['train_model_flops'] / a['train_6n_flops']:.1%} |", ""]
    if results.get("h100"):
        lines += ["H100 SXM, compiled predictions (deviceless AOT; nothing ran on a GPU; roofline at 989 TFLOP/s bf16 "
                  "and 3.35 TB/s):", "",
                  "| program | optimizer | TFLOP | GB accessed | peak GiB | temp GiB | roofline ms | bound | matmul "
                  "kernels (cuBLAS + Triton) | compile s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in results["h100"]:
            program = r["program"] + (f" {r['micro_batch']}x{r['accum']} {r['attention']}" if "accum" in r else "")
            cublas = sum(v for k, v in r["custom_calls"].items() if k.startswith("__cublas"))
            gemms = f"{cublas} + {r['triton_gemm_fusions']}"
            lines.append(f"| {program} | {r['optimizer']} | {r['flops'] / 1e12:.3f} | {r['bytes_accessed'] / 1e9:.2f} | "
                         f"{r['peak_bytes'] / GiB:.2f} | {r['temp_bytes'] / GiB:.2f} | {r['roofline_s'] * 1e3:.2f} | "
                         f"{r['roofline_bound']} | {gemms} | {r['compile_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed CPU calls per optimizer (after one warm-up)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU timing")
    ap.add_argument("--no-gpu", action="store_true", help="skip the H100 compiles")
    ap.add_argument("--no-train-step", action="store_true", help="compile the update programs only, not the "
                    "whole train steps")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    args = ap.parse_args(argv)
    t_start = time.time()
    config = preset(RUN_PRESETS["gpt2"].model)
    load_before = os.getloadavg()[0]
    results = {"date": datetime.date.today().isoformat(), "commit": cuda_compile.git_commit(), "cpu": cpu_info()["model"],
               "cpu_threads": len(os.sched_getaffinity(0)), "jax": jax.__version__,
               "command": " ".join(["python benchmarks/optimizer_cost.py",
                                    *(argv if argv is not None else sys.argv[1:])])}
    params = nnx.state(nnx.eval_shape(lambda: GPT(config)), nnx.Param)
    run = RUN_PRESETS["gpt2"]
    n = params_without_wpe(params, config)
    ns = newton_schulz_flops(params)
    results["analytic"] = {
        "ns_steps": NS_STEPS, "muon_matrices": sum(c for _, c in ns["matrices"]), "matrix_shapes": ns["matrices"],
        "ns_matmul_flops": ns["matmul"], "ns_small_flops": ns["small"], "n_without_wpe": n,
        "tokens": run.total_batch_size, "train_6n_flops": 6 * n * run.total_batch_size,
        "train_model_flops": flops_per_token(config, n, run.seq_len) * run.total_batch_size}
    if not args.no_cpu:
        results["cpu_ms"] = cpu_times(config, args.repeats)
    if not args.no_gpu:
        if not cuda_compile.plugin_installed():
            print(f"error: no jax CUDA plugin in {cuda_compile.AOT_DIR}: run `make cuda-plugin` (or --no-gpu)",
                  file=sys.stderr)
            return 2
        results["h100"] = compiled_rows(config, not args.no_train_step)
    results["load_average"] = [load_before, os.getloadavg()[0]]
    results["wall_s"] = round(time.time() - t_start, 1)
    print(markdown(results))
    print(f"\n(wall {results['wall_s']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
