"""Compile, for NVIDIA GPUs, the programs a GPU run executes, on a machine with no GPU: `make cuda-compile`.

    python benchmarks/cuda_compile.py --out cuda_compile.json                  # every target and program
    python benchmarks/cuda_compile.py --targets h100 --programs train_step     # what `make test` runs

XLA compiles for CUDA without a GPU or a driver ("deviceless" ahead-of-time compilation) given the jax CUDA
plugin of jax's own version and ptxas (`make cuda-plugin` puts them in <venv>/cuda-aot, which this script puts
on its path). Each target is a device description written from its datasheet (benchmarks/gpu_targets/).
Each row: XLA's memory analysis of the compiled program (what one GPU must hold), its custom calls, FLOPs and
bytes (benchmarks/hlo_cost.py) and a roofline lower bound on its time. These are compiled predictions: nothing
runs, no autotuning happens, and cuDNN's own workspace and allocator fragmentation are not in the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AOT_DIR = Path(os.environ.get("FLAX_GPT_CUDA_AOT", Path(sys.prefix) / "cuda-aot"))  # the plugin, nvcc and nvvm wheels
if __name__ == "__main__":
    os.environ["JAX_PLATFORMS"] = "cpu"  # compile for the GPU, run nothing: JAX itself stays on the CPU
    sys.path[1:1] = [str(AOT_DIR), str(ROOT)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hlo_cost  # noqa: E402

from flax_gpt import GPT, evaluate, generate, ops, preset  # noqa: E402
from flax_gpt.devices import cpu_info  # noqa: E402
from flax_gpt.metrics import flops_per_token, params_without_wpe  # noqa: E402
from flax_gpt.optim import OptimConfig, lr_schedule, make_optimizer  # noqa: E402
from flax_gpt.run_config import RUN_PRESETS  # noqa: E402
from flax_gpt.train_step import init_state, make_eval_step, make_train_step  # noqa: E402

HEADROOM = 0.10  # a train step "fits" when it needs at most 90% of the device's memory


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU to compile for: its device description and the datasheet figures of its roofline."""

    name: str
    proto: str  # file in benchmarks/gpu_targets
    memory_bytes: int  # device_memory_size of the description
    bandwidth: float  # bytes/s
    peak: dict  # compute dtype -> dense FLOP/s (tensor cores, float32 accumulation)
    dtypes: tuple[str, ...]  # what it computes in here (no bf16 below compute capability 8.0)
    micro_batch: int  # the gpt2 preset's micro batch on it


TARGETS = {
    "h100": Target("h100", "h100.txtpb", 85520809984, 3.35e12, {"bfloat16": 989e12}, ("bfloat16",),
                   RUN_PRESETS["gpt2"].batch_size),
    "h200": Target("h200", "h200.txtpb", 141_000_000_000, 4.8e12, {"bfloat16": 989e12}, ("bfloat16",),
                   RUN_PRESETS["gpt2"].batch_size),
    # T4: no bf16; float16 on tensor cores (65 TFLOP/s dense), float32 without (8.1 TFLOP/s); micro batch 8 (x64) is
    # build-nanogpt's tokens per step in 16 GB
    "t4": Target("t4", "t4.txtpb", 15843721216, 320e9, {"float16": 65e12, "float32": 8.1e12}, ("float16", "float32"), 8),
}
# train_step_dropout: the train step with --dropout DROPOUT (XLA attention: cuDNN's refuses the run's masks);
# train_step_muon: the train step with --optimizer muon (flax_gpt/muon.py on the blocks' matrices, AdamW on the rest)
PROGRAMS = ("train_step", "eval_step", "hellaswag_step", "prefill", "decode_step", "train_step_dropout",
            "train_step_muon")
TRAIN_VARIANTS = ("train_step_dropout", "train_step_muon")  # train-step rows, not programs of their own
DROPOUT = 0.1
HOST_OPCODES = (" infeed(", " outfeed(", " send(", " recv(", " send-done(", " recv-done(")  # ops that need the host
CPU_TARGETS = ("callback", "cpu", "lapack", "ducc")  # custom calls that run Python or CPU code


def cudnn_stand_in() -> None:
    """cuDNN attention asks libcudnn for its version while tracing; with no libcudnn here, accept the target's
    (dnn_version_info in its description) instead of failing."""
    from jax._src.cudnn import fused_attention_stablehlo

    try:
        fused_attention_stablehlo.check_cudnn_version()
    except (RuntimeError, ImportError, OSError):
        fused_attention_stablehlo.check_cudnn_version = lambda *args, **kwargs: None


def gpu_device(target: Target):
    """The one device of a deviceless CUDA topology described by the target's proto."""
    from jax.experimental import topologies

    proto = (ROOT / "benchmarks" / "gpu_targets" / target.proto).read_text()
    return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=proto).devices[0]


def on(device, tree):
    """Abstract arrays of `tree` placed on `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def programs(name: str, config, micro_batch: int, accum: int, seq_len: int, device, optimizer: str = "adamw"):
    """(jitted function, abstract arguments, sequences, tokens it processes) of one program of a gpt2-preset GPU
    run; the train step with OptimConfig(optimizer=optimizer)."""
    model = nnx.eval_shape(lambda: GPT(config))
    if name == "train_step":
        tx = make_optimizer(OptimConfig(optimizer=optimizer))
        state = nnx.eval_shape(lambda: init_state(GPT(config), tx)[1])
        step = make_train_step(nnx.split(model, nnx.Param)[0], tx, lr_schedule(OptimConfig()))
        x = jax.ShapeDtypeStruct((accum, micro_batch, seq_len), jnp.int32)
        return step, on(device, (state, x, x)), micro_batch, accum * micro_batch * seq_len
    graphdef, params = nnx.split(model, nnx.Param)
    if name == "eval_step":  # the val loss: one micro batch
        x = jax.ShapeDtypeStruct((micro_batch, seq_len), jnp.int32)
        return make_eval_step(graphdef), on(device, (params, x, x)), micro_batch, micro_batch * seq_len
    if name == "hellaswag_step":  # train.py's rows: 4 endings of batch_size // 4 examples; real rows are < 256 tokens
        rows = jax.ShapeDtypeStruct((micro_batch, 256), jnp.int32)
        return evaluate.make_hellaswag_step(graphdef, 64), on(device, (params, rows, rows)), micro_batch, micro_batch * 256
    graphdef, state = nnx.split(model)
    samples, prompt_len, cache_len = 3, generate.PROMPT_BUCKET, config.block_size  # generate's default samples
    sampling = dict(temperature=1.0, top_k=50, top_p=None)
    key = jax.eval_shape(lambda: jax.random.key(0))
    if name == "prefill":
        prompt = jax.ShapeDtypeStruct((samples, prompt_len), jnp.int32)
        fn = jax.jit(lambda p, x, n, k: generate._prefill(graphdef, p, x, n, k, cache_len, **sampling))
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        return fn, on(device, (state, prompt, scalar, key)), samples, samples * prompt_len
    cache = jax.eval_shape(lambda: GPT.init_kv_cache(model, samples, cache_len))
    token, pos = jax.ShapeDtypeStruct((samples,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    fn = jax.jit(lambda p, t, c, n, k, i: generate._step(graphdef, p, t, c, n, k, i, **sampling), donate_argnums=2)
    return fn, on(device, (state, token, cache, pos, key, pos)), samples, samples


def host_ops(text: str) -> list[str]:
    """Ops of a compiled GPU program that would stop it for the host: transfers, callbacks, CPU custom calls."""
    targets = [t for t in hlo_cost.custom_call_targets(text) if any(c in t.lower() for c in CPU_TARGETS)]
    return sorted({op.strip(" (") for op in HOST_OPCODES if op in text} | set(targets))


def plugin_installed() -> bool:
    """Whether AOT_DIR holds a jax CUDA plugin."""
    plugins = AOT_DIR / "jax_plugins"
    return plugins.is_dir() and any(p.name.startswith("xla_cuda") for p in plugins.iterdir())


def measure(target: Target, fn, args, dtype: str) -> dict:
    """Compile fn for the target's device on its abstract arguments: XLA's memory analysis, custom calls, host ops,
    FLOPs and bytes (hlo_cost) and the roofline at the target's `dtype` peak, as row fields."""
    t0 = time.time()
    compiled = fn.trace(*args).lower().compile()
    compile_s = time.time() - t0
    text = compiled.as_text()
    memory = compiled.memory_analysis()
    peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                  + memory.temp_size_in_bytes)
    cost = hlo_cost.program_cost(text)
    peak_flops = target.peak[dtype]
    roofline_s = max(cost["flops"] / peak_flops, cost["bytes_accessed"] / target.bandwidth)
    return {
        "peak_bytes": peak_bytes, "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes, "device_memory_bytes": target.memory_bytes,
        "fits": peak_bytes <= (1 - HEADROOM) * target.memory_bytes, "compile_s": round(compile_s, 1),
        "custom_calls": hlo_cost.custom_call_targets(text),
        "triton_gemm_fusions": len(re.findall(r'"kind":"__triton\w*gemm\w*"', text)),  # the matmuls not in cuBLAS
        "host_ops": host_ops(text),
        "flops": cost["flops"], "bytes_accessed": cost["bytes_accessed"],
        "roofline_s": roofline_s, "roofline_bound": "compute" if cost["flops"] / peak_flops >= cost["bytes_accessed"]
        / target.bandwidth else "memory",
    }


def compile_row(target: Target, device, program: str, dtype: str, attention: str, remat: bool, micro_batch: int,
                accum: int, loss_chunk: int | None = None, dropout: float = 0.0, optimizer: str = "adamw") -> dict:
    """Compile one program for the target; its memory, custom calls, cost and roofline as one JSON row.

    loss_chunk: tokens per chunk of the lm_head + loss (ops.LOSS_CHUNK, chosen for CPU memory), 0 for the full
    logits with plain autodiff; None keeps the library's choice. optimizer: the train step's (adamw or muon).
    """
    run = RUN_PRESETS["gpt2"]
    config = preset(run.model, dtype=dtype, attention=attention, remat=remat, dropout=dropout)
    fn, args, micro_batch, tokens = programs(program, config, micro_batch, accum, run.seq_len, device, optimizer)
    kept = ops.LOSS_CHUNK, ops.FULL_LOGITS_TOKENS
    if loss_chunk is not None:  # read while tracing
        ops.LOSS_CHUNK, ops.FULL_LOGITS_TOKENS = (loss_chunk, kept[1]) if loss_chunk else (kept[0], 2**62)
    try:
        measured = measure(target, fn, args, dtype)
    finally:
        ops.LOSS_CHUNK, ops.FULL_LOGITS_TOKENS = kept
    n_params = params_without_wpe(nnx.state(nnx.eval_shape(lambda: GPT(config)), nnx.Param), config)
    model_flops = flops_per_token(config, n_params, run.seq_len) * tokens
    return {
        "target": target.name, "device": device.device_kind, "program": program, "attention": attention,
        "loss_chunk": ops.LOSS_CHUNK if loss_chunk is None else loss_chunk, "xla_flags": os.environ.get("XLA_FLAGS"),
        "remat": remat, "dropout": dropout, "optimizer": optimizer, "dtype": dtype, "micro_batch": micro_batch,
        "accum": accum, "seq_len": run.seq_len, "tokens": tokens, **measured,
        "mfu_at_roofline": model_flops / (measured["roofline_s"] * target.peak[dtype]) if program == "train_step"
        else None,
    }


def plan(target: Target, wanted: tuple[str, ...], loss_chunks: list[int] | None = None) -> list[dict]:
    """The rows to compile for a target: the train step with each attention and remat, then the others; with
    loss_chunks, the train step with the default attention and no remat at each chunk size instead."""
    run = RUN_PRESETS["gpt2"]
    accum = run.total_batch_size // (target.micro_batch * run.seq_len)
    if loss_chunks:
        return [dict(program="train_step", dtype=target.dtypes[0], attention="cudnn" if target.dtypes[0] == "bfloat16"
                     else "xla", remat=False, micro_batch=target.micro_batch, accum=accum, loss_chunk=c)
                for c in loss_chunks]
    rows = []
    for dtype in target.dtypes:
        attentions = ("cudnn", "xla") if dtype == "bfloat16" else ("xla",)  # cuDNN flash attention: on Ampere and newer
        auto = attentions[0]
        train = dict(program="train_step", dtype=dtype, micro_batch=target.micro_batch, accum=accum)
        if "train_step" in wanted:
            rows += [dict(train, attention=a, remat=r) for a in attentions for r in (False, True)]
        if "train_step_dropout" in wanted:
            rows += [dict(train, attention="xla", remat=False, dropout=DROPOUT)]
        if "train_step_muon" in wanted and dtype == "bfloat16":  # Newton-Schulz in bf16: not on a T4
            rows += [dict(train, attention=auto, remat=False, optimizer="muon")]
        if dtype == "float16":  # train.py trains in float16 there (--dtype auto), and evaluates in float32
            continue
        rows += [dict(program=p, dtype=dtype, attention=auto, remat=False, micro_batch=target.micro_batch, accum=1)
                 for p in PROGRAMS[1:] if p in wanted and p not in TRAIN_VARIANTS]
    return rows


def summary(row: dict) -> str:
    """One line of the table printed as rows finish."""
    GiB = 2**30
    mfu = f"{row['mfu_at_roofline']:.0%}" if row["mfu_at_roofline"] is not None else "-"
    return (f"{row['target']:5} {row['program']:14} {row['dtype']:8} {row['attention']:5} remat={row['remat']!s:5} "
            f"{'dropout=' + str(row['dropout']) + ' ' if row.get('dropout') else ''}"
            f"{'optimizer=' + row['optimizer'] + ' ' if row.get('optimizer', 'adamw') != 'adamw' else ''}"
            f"{row['micro_batch']:3}x{row['accum']:<2} peak {row['peak_bytes'] / GiB:6.2f} GiB "
            f"({'fits' if row['fits'] else 'DOES NOT FIT'} {row['device_memory_bytes'] / GiB:.0f} GiB) "
            f"{row['flops'] / 1e12:8.2f} TFLOP {row['bytes_accessed'] / 1e9:8.1f} GB roofline "
            f"{row['roofline_s'] * 1e3:8.2f} ms ({row['roofline_bound']}) MFU<={mfu} compile {row['compile_s']} s")


def git_commit() -> str | None:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except OSError:
        return None
    return head.stdout.strip() + ("+changes" if dirty else "") if head.returncode == 0 else None


def markdown(results: dict) -> str:
    """The rows of a results file as the table of docs/gpus.md."""
    GiB = 2**30
    lines = ["| target | program | attention | remat | dtype | micro batch x accum | peak GiB (of) | fits with 10% |"
             " TFLOP | GB accessed | roofline ms | MFU at roofline | compile s |",
             "| --- | --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["rows"]:
        mfu = f"{r['mfu_at_roofline']:.0%}" if r["mfu_at_roofline"] is not None else "-"
        program = r["program"] + (f" (dropout {r['dropout']})" if r.get("dropout") else "") + (
            f" ({r['optimizer']})" if r.get("optimizer", "adamw") != "adamw" else "")
        lines.append(f"| {r['target']} | {program} | {r['attention']} | {'yes' if r['remat'] else 'no'} | "
                     f"{r['dtype']} | {r['micro_batch']}x{r['accum']} | {r['peak_bytes'] / GiB:.2f} "
                     f"({r['device_memory_bytes'] / GiB:.1f}) | {'yes' if r['fits'] else 'no'} | "
                     f"{r['flops'] / 1e12:.2f} | {r['bytes_accessed'] / 1e9:.1f} | {r['roofline_s'] * 1e3:.1f} "
                     f"({r['roofline_bound']}) | {mfu} | {r['compile_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument("--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS))
    ap.add_argument("--out", default="cuda_compile.json")
    ap.add_argument("--loss-chunks", type=int, nargs="+", metavar="TOKENS",
                    help="compare the train step at these lm_head + loss chunk sizes (0: full logits, autodiff)")
    ap.add_argument("--markdown", metavar="RESULTS", help="print a results file's rows of --targets and --programs as "
                    "a table; compile nothing")
    args = ap.parse_args(argv)
    if args.markdown:
        results = json.loads(Path(args.markdown).read_text())
        rows = [r for r in results["rows"] if r["target"] in args.targets and r["program"] in args.programs]
        print(markdown({**results, "rows": rows}))
        return 0
    if not plugin_installed():
        print(f"error: no jax CUDA plugin in {AOT_DIR}: run `make cuda-plugin` (or set FLAX_GPT_CUDA_AOT)",
              file=sys.stderr)
        return 2
    cudnn_stand_in()
    about = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "cpu": cpu_info()["model"],  # compile_s depends on it
             "command": " ".join(["python benchmarks/cuda_compile.py", *(argv if argv is not None else sys.argv[1:])]),
             "jax": jax.__version__}
    rows = []
    for name in args.targets:
        target = TARGETS[name]
        device = gpu_device(target)
        for spec in plan(target, tuple(args.programs), args.loss_chunks):
            rows.append(compile_row(target, device, **spec))
            print(summary(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps({**about, "rows": rows}, indent=1))  # as they finish
    return 0


if __name__ == "__main__":
    sys.exit(main())
