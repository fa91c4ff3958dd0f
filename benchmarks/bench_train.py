"""Side-by-side train-step speed: flax_gpt vs torch_ref, same config, batch, threads, one process.

    python benchmarks/bench_train.py --preset small --batch-size 8 --seq-len 256 --json out.json

Each variant is built and its first step timed alone (time to first step, compile included). Then the
variants take turns, one step each per round (--warmup rounds untimed, --steps rounds timed), so a slow
phase of the machine hits every variant alike; the table reports each variant's median ms/step,
tokens/s, MFU against a matmul peak measured here for that dtype, and the process's peak RSS after the
variant was built. The flax rows also report host overhead: the time the step's call takes to return
(cache lookup, argument handling, dispatch) as a share of the whole step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_first(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def time_rounds(steps: dict, n_warmup: int, n_rounds: int) -> dict[str, list[float]]:
    """Per-variant step seconds over n_rounds rounds; each round runs every variant's step once."""
    times = {name: [] for name in steps}
    for r in range(n_warmup + n_rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= n_warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def flax_step_fn(config, batch, opt_cfg):
    """A zero-argument callable running one jitted flax_gpt train step to completion."""
    import jax
    import jax.numpy as jnp

    from flax_gpt import GPT
    from flax_gpt.optim import lr_schedule, make_optimizer
    from flax_gpt.train_step import init_state, make_train_step

    tx = make_optimizer(opt_cfg)
    graphdef, state = init_state(GPT(config), tx)
    train_step = make_train_step(graphdef, tx, lr_schedule(opt_cfg))
    x, y = (jnp.asarray(a[None]) for a in batch)  # (1, B, T)
    holder = {"state": state}

    def step():
        t0 = time.perf_counter()
        holder["state"], metrics = train_step(holder["state"], x, y)
        step.host_s.append(time.perf_counter() - t0)  # until the call returns: cache lookup, arguments, dispatch
        jax.block_until_ready(metrics)

    step.host_s = []
    return step


def torch_step_fn(config, batch, opt_cfg, autocast: bool, compile_model: bool):
    import torch

    import torch_ref

    model = torch_ref.GPT(torch_ref.config_from_flax(config))
    optimizer = model.configure_optimizers(opt_cfg.weight_decay, opt_cfg.lr, "cpu")
    if compile_model:
        model = torch.compile(model)
    x, y = (torch.from_numpy(a.astype("int64")) for a in batch)
    dtype = torch.bfloat16 if autocast else None

    def step():
        torch_ref.train_step(model, optimizer, [(x, y)], opt_cfg.lr, opt_cfg.grad_clip, autocast_dtype=dtype)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", nargs="+",
                    default=["flax-fp32", "flax-bf16", "torch-eager-fp32", "torch-eager-bf16"],
                    help="any of flax-fp32 flax-bf16 torch-eager-fp32 torch-eager-bf16 torch-compile-fp32 torch-compile-bf16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc as it is (train.py tunes it, for every framework in this process too)")
    args = ap.parse_args()
    from flax_gpt.host_memory import keep_freed_memory

    malloc = "glibc default" if args.default_malloc else ("freed memory kept" if keep_freed_memory() else "default")

    import jax
    import numpy as np
    import torch

    from flax_gpt import preset
    from flax_gpt.metrics import flops_per_token, measured_matmul_peak
    from flax_gpt.optim import OptimConfig

    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    if args.seq_len > config.block_size:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds {args.preset}'s block_size {config.block_size}")
    rng = np.random.default_rng(0)
    batch = tuple(rng.integers(0, config.vocab_size, (args.batch_size, args.seq_len), dtype=np.int32) for _ in range(2))
    opt_cfg = OptimConfig(lr=6e-4, warmup_steps=10, max_steps=1000)
    tokens = args.batch_size * args.seq_len
    peaks = {"fp32": measured_matmul_peak("float32"), "bf16": measured_matmul_peak("bfloat16")}

    from flax_gpt import GPT

    flops = flops_per_token(config, GPT(config).num_params(), args.seq_len) * tokens  # the same model in every variant
    results, steps = {}, {}
    for variant in args.variants:
        framework, *mode, dtype = variant.split("-")
        if framework == "flax":
            cfg = config.replace(dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
            steps[variant] = flax_step_fn(cfg, batch, opt_cfg)
        else:
            steps[variant] = torch_step_fn(config, batch, opt_cfg, autocast=dtype == "bf16",
                                           compile_model=mode == ["compile"])
        first = time_first(steps[variant])
        results[variant] = {"first_step_s": first, "peak_rss_mb": peak_rss_mb()}
        print(f"{variant:20s} first step {first:6.1f} s", flush=True)
    times = time_rounds(steps, args.warmup, args.steps)
    for variant, r in results.items():
        dtype = variant.split("-")[-1]
        median = statistics.median(times[variant])
        r |= {"median_ms": median * 1e3, "tok_s": tokens / median, "mfu_vs_measured_peak": flops / median / peaks[dtype]}
        host = getattr(steps[variant], "host_s", None)
        if host:
            r["host_overhead"] = statistics.median(host[-args.steps:]) / median
        print(f"{variant:20s} {median * 1e3:9.1f} ms/step {tokens / median:9.0f} tok/s", flush=True)

    header = (f"preset {args.preset}, B={args.batch_size}, T={args.seq_len}, {args.threads} threads, "
              f"{platform.machine()} {os.cpu_count()} cores, malloc {malloc}; jax {jax.__version__}, torch {torch.__version__}; "
              f"measured matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print("\n" + header + "\n")
    print("| variant | median ms/step | tokens/s | first step s | MFU (measured peak) | host overhead | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        host = f"{r['host_overhead']:.2%}" if "host_overhead" in r else "-"
        print(f"| {name} | {r['median_ms']:.0f} | {r['tok_s']:.0f} | {r['first_step_s']:.1f} | "
              f"{r['mfu_vs_measured_peak']:.1%} | {host} | {r['peak_rss_mb']:.0f} |")
    summary = {"header": header, "variants": results}
    if "flax-fp32" in results and "torch-eager-fp32" in results:
        ratio = results["flax-fp32"]["tok_s"] / results["torch-eager-fp32"]["tok_s"]
        summary |= {"flax_tok_s": results["flax-fp32"]["tok_s"], "torch_eager_tok_s": results["torch-eager-fp32"]["tok_s"],
                    "flax_over_torch_fp32": ratio}
        print(f"\nflax / torch_ref eager, fp32: {ratio:.2f}x")
    flax_best = max((r["tok_s"], n) for n, r in results.items() if n.startswith("flax"))
    torch_best = max(((r["tok_s"], n) for n, r in results.items() if n.startswith("torch")), default=None)
    if torch_best:
        summary |= {"best_flax": flax_best[1], "best_torch": torch_best[1], "best_over_best": flax_best[0] / torch_best[0]}
        print(f"best flax ({flax_best[1]}) / best torch ({torch_best[1]}): {flax_best[0] / torch_best[0]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
