"""Side-by-side train-step speed: flax_gpt vs torch_ref, same config, batch, threads, one process.

    python benchmarks/bench_train.py --preset small --batch-size 8 --seq-len 256 --json out.json
    python benchmarks/bench_train.py --preset gpt2 --batch-size 16 --seq-len 1024 --steps 20 --warmup 3   # on a GPU

On a GPU (--device auto picks it when both JAX and torch see one) the default variants are flax bf16 with
XLA's and with cuDNN's attention against torch_ref bf16 eager and torch.compile (SDPA attention, fused AdamW);
cuDNN attention is first checked against XLA's on the model's shapes and is not timed if it disagrees. MFU
is also reported against the GPU's datasheet bf16 peak.

Each variant is built and its first step timed alone (time to first step, compile included). Then the
variants take turns, one step each per round (--warmup rounds untimed, --steps rounds timed), so a slow
phase of the machine hits every variant alike; the table reports each variant's median ms/step,
tokens/s, MFU against a matmul peak measured here for that dtype, and the process's peak RSS after the
variant was built. The flax rows also report host overhead: the time the step's call takes to return
(cache lookup, argument handling, dispatch) as a share of the whole step. Every variant starts from the same
weights (flax_gpt's init) on the same batch and learning-rate schedule; the JSON keeps each variant's losses,
so a variant that computes something else shows there.
"""

from __future__ import annotations

import argparse
import json
import os
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


INIT_SEED = 0  # every variant starts from flax_gpt's init with this seed
CUDNN_REL_BOUND = 2e-2  # bf16 attention, cuDNN vs XLA, norm(diff)/norm(ref): the parity table's bf16 bound (parity_tests/checks.py BF16_REL)


def relative(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_cudnn_attention(config, batch, candidate: str = "cudnn") -> dict:
    """`candidate` (cuDNN) vs XLA attention, bf16: the attention alone (output, q, k, v gradients) and the model's
    training loss and gradients."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flax_gpt import GPT
    from flax_gpt.train_step import loss_fn

    B, T = batch[0].shape
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, config.n_head, config.head_dim)), jnp.bfloat16) for _ in range(3))

    def attention_loss(impl):
        def loss(q, k, v):
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)  # (B, T, nh, hs)
            return (y.astype(jnp.float32) ** 2).mean(), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    (_, y_xla), g_xla = attention_loss("xla")(q, k, v)
    (_, y_cudnn), g_cudnn = attention_loss(candidate)(q, k, v)
    model_loss, model_grads = {}, {}
    for name, impl in (("xla", "xla"), ("cudnn", candidate)):
        graphdef, params = nnx.split(GPT(config.replace(dtype="bfloat16", attention=impl)), nnx.Param)  # same weights
        loss, grads = jax.jit(jax.value_and_grad(lambda p, x, y, g=graphdef: loss_fn(p, g, x, y)))(params, *batch)
        model_loss[name], model_grads[name] = float(loss), jax.tree.leaves(grads)
    result = {"output_rel": relative(y_cudnn, y_xla),
              "grad_rel": max(relative(a, b) for a, b in zip(g_cudnn, g_xla)),
              "model_loss_xla": model_loss["xla"], "model_loss_cudnn": model_loss["cudnn"],
              "model_grad_rel": max(relative(a, b) for a, b in zip(model_grads["cudnn"], model_grads["xla"]))}
    result["ok"] = max(result["output_rel"], result["grad_rel"], result["model_grad_rel"]) <= CUDNN_REL_BOUND and \
        abs(model_loss["cudnn"] - model_loss["xla"]) <= CUDNN_REL_BOUND * abs(model_loss["xla"])
    return result


def flax_step_fn(config, batch, opt_cfg):
    """A zero-argument callable running one jitted flax_gpt train step to completion; step.losses collects the losses."""
    import jax
    import jax.numpy as jnp

    from flax_gpt import GPT
    from flax_gpt.optim import lr_schedule, make_optimizer
    from flax_gpt.train_step import init_state, make_train_step

    tx = make_optimizer(opt_cfg)
    graphdef, state = init_state(GPT(config, seed=INIT_SEED), tx)
    train_step = make_train_step(graphdef, tx, lr_schedule(opt_cfg))
    x, y = (jnp.asarray(a[None]) for a in batch)  # (1, B, T)
    holder = {"state": state}

    def step():
        t0 = time.perf_counter()
        holder["state"], metrics = train_step(holder["state"], x, y)
        step.host_s.append(time.perf_counter() - t0)  # until the call returns: cache lookup, arguments, dispatch
        step.losses.append(jax.block_until_ready(metrics)["loss"])

    step.host_s, step.losses = [], []
    return step


def torch_step_fn(config, batch, opt_cfg, autocast: bool, compile_model: bool, device: str):
    """One torch_ref train step as build-nanogpt runs it: SDPA attention, AdamW fused on CUDA, bf16 autocast.

    The model starts from flax_gpt's init (the same weights as the flax variants) and follows the same
    learning-rate schedule, so every variant's losses can be compared; step.losses collects them.
    """
    import torch

    import torch_ref
    from flax_gpt import GPT
    from flax_gpt.optim import lr_at

    model = torch_ref.flax_to_torch(GPT(config, seed=INIT_SEED)).to(device)
    optimizer = model.configure_optimizers(opt_cfg.weight_decay, opt_cfg.lr, device)
    if compile_model:
        model = torch.compile(model)
    x, y = (torch.from_numpy(a.astype("int64")).to(device) for a in batch)
    dtype = torch.bfloat16 if autocast else None

    def step():
        lr = lr_at(len(step.losses), opt_cfg)
        loss, _ = torch_ref.train_step(model, optimizer, [(x, y)], lr, opt_cfg.grad_clip, autocast_dtype=dtype)
        step.losses.append(loss)
        if device == "cuda":
            torch.cuda.synchronize()

    step.losses = []
    return step


def device_peak_mb(framework: str, device: str) -> float | None:
    """Peak accelerator memory so far (JAX: over the whole process; torch: since its last reset)."""
    if device != "cuda":
        return None
    if framework == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import jax

    return jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=None,
                    help="any of flax-fp32 flax-bf16 (the attention train.py picks), flax-{xla,tiled}-{fp32,bf16}, "
                         "flax-cudnn-bf16, torch-eager-fp32 torch-eager-bf16 torch-compile-fp32 "
                         "torch-compile-bf16; default: fp32 and bf16 of flax and torch eager (CPU), the bf16 ones (GPU)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc as it is (train.py tunes it on CPU; here it would apply to every framework)")
    args = ap.parse_args()
    from flax_gpt.host_memory import jax_runs_on_cpu, keep_freed_memory

    tuned = not args.default_malloc and jax_runs_on_cpu(args.device) and keep_freed_memory()  # as train.py does
    malloc = "freed memory kept" if tuned else ("glibc default" if args.default_malloc else "default")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch as well
    import jax

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    import numpy as np
    import torch

    from flax_gpt import preset
    from flax_gpt.devices import attention_implementation, cpu_info, cpu_line
    from flax_gpt.metrics import flops_per_token, measured_matmul_peak, mfu, peak_flops
    from flax_gpt.optim import OptimConfig

    torch.set_num_threads(args.threads)
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    if args.device == "cuda" and not on_gpu:
        raise SystemExit("--device cuda: JAX and torch must both see a CUDA GPU")
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # build-nanogpt's 'high' float32 matmul precision
    variants = args.variants or (["flax-xla-bf16", "flax-cudnn-bf16", "torch-eager-bf16", "torch-compile-bf16"] if on_gpu
                                 else ["flax-fp32", "flax-bf16", "torch-eager-fp32", "torch-eager-bf16"])
    config = preset(args.preset)
    if args.seq_len > config.block_size:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds {args.preset}'s block_size {config.block_size}")
    rng = np.random.default_rng(0)
    batch = tuple(rng.integers(0, config.vocab_size, (args.batch_size, args.seq_len), dtype=np.int32) for _ in range(2))
    opt_cfg = OptimConfig(lr=6e-4, warmup_steps=10, max_steps=1000)
    tokens = args.batch_size * args.seq_len
    # the step's device; on an H100 a 2048 matmul takes ~20 us, less than its launch: it measured 123 TFLOP/s in bf16
    matmul_n = 8192 if on_gpu else 2048
    peaks = {"fp32": measured_matmul_peak("float32", n=matmul_n), "bf16": measured_matmul_peak("bfloat16", n=matmul_n)}
    datasheet_peak, peak_source = peak_flops("bfloat16", jax.devices()[:1]) if on_gpu else (None, None)

    from flax_gpt import GPT

    flops = flops_per_token(config, GPT(config).num_params(), args.seq_len) * tokens  # the same model in every variant
    results, steps, extra = {}, {}, {}
    if "flax-cudnn-bf16" in variants:
        extra["cudnn_check"] = check_cudnn_attention(config, batch)
        print(f"cuDNN vs XLA attention (bf16, bound {CUDNN_REL_BOUND}): {extra['cudnn_check']}", flush=True)
        if not extra["cudnn_check"]["ok"]:
            variants = [v for v in variants if v != "flax-cudnn-bf16"]
            print("cuDNN attention disagrees with XLA's: flax-cudnn-bf16 is not timed", flush=True)
    for variant in variants:
        framework, *mode, dtype = variant.split("-")
        if framework == "flax":
            compute = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
            attention = mode[0] if mode else attention_implementation("auto", jax.default_backend(), compute,
                                                                             train_seq_len=args.seq_len)
            cfg = config.replace(dtype=compute, attention=attention)
            steps[variant] = flax_step_fn(cfg, batch, opt_cfg)
        else:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            steps[variant] = torch_step_fn(config, batch, opt_cfg, autocast=dtype == "bf16",
                                           compile_model=mode == ["compile"], device=device)
        first = time_first(steps[variant])
        results[variant] = {"first_step_s": first, "peak_rss_mb": peak_rss_mb()}
        if on_gpu:
            results[variant]["peak_device_mb"] = device_peak_mb(framework, device)
        print(f"{variant:20s} first step {first:6.1f} s", flush=True)
    times = time_rounds(steps, args.warmup, args.steps)
    for variant, r in results.items():
        dtype = variant.split("-")[-1]
        median = statistics.median(times[variant])
        r |= {"median_ms": median * 1e3, "tok_s": tokens / median, "mfu_vs_measured_peak": mfu(flops / median, peaks[dtype])}
        if on_gpu:
            r["mfu_vs_datasheet_peak"] = mfu(flops / median, datasheet_peak)
        host = getattr(steps[variant], "host_s", None)
        if host:
            r["host_overhead"] = statistics.median(host[-args.steps:]) / median
        r["losses"] = [float(loss) for loss in steps[variant].losses]  # first step, warmup rounds, timed rounds
        print(f"{variant:20s} {median * 1e3:9.1f} ms/step {tokens / median:9.0f} tok/s, loss {r['losses'][0]:.4f} "
              f"-> {r['losses'][-1]:.4f}", flush=True)

    cpu = cpu_info()
    datasheet = f"MFU also against {peak_source} {datasheet_peak / 1e12:.0f} TFLOP/s" if datasheet_peak else peak_source
    where = (f"{jax.devices()[0].device_kind}, {datasheet}" if on_gpu
             else f"{cpu_line(cpu)}, {args.threads} threads, {os.cpu_count()} cores, malloc {malloc}")
    header = (f"preset {args.preset}, B={args.batch_size}, T={args.seq_len}, {where}; jax {jax.__version__}, torch {torch.__version__}; "
              f"measured {matmul_n}x{matmul_n} matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print("\n" + header + "\n")
    gpu_cols = " MFU (datasheet) | peak GPU MB |" if on_gpu else ""
    print(f"| variant | median ms/step | tokens/s | first step s | MFU (measured peak) |{gpu_cols} host overhead | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * (2 if on_gpu else 1))
    for name, r in results.items():
        host = f"{r['host_overhead']:.2%}" if "host_overhead" in r else "-"
        datasheet_mfu = f"{r['mfu_vs_datasheet_peak']:.1%}" if datasheet_peak else "-"
        gpu = f" {datasheet_mfu} | {r['peak_device_mb']:.0f} |" if on_gpu else ""
        print(f"| {name} | {r['median_ms']:.0f} | {r['tok_s']:.0f} | {r['first_step_s']:.1f} | "
              f"{r['mfu_vs_measured_peak']:.1%} |{gpu} {host} | {r['peak_rss_mb']:.0f} |")
    summary = {"header": header, "device": device, "variants": results} | extra | ({} if on_gpu else {"cpu": cpu})
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
