"""Where a CPU train step's time goes: XLA's profile of a few steps, each op's time summed by the source line
that made it (ops.py:337 matmul, tiled_attention.py:46 _forward, ...) and by XLA's kind of op (ynn_fusion: a
dot or reduction in XLA:CPU's fast YNNPACK kernels; dot: XLA's own; *_fusion: elementwise loops).

    python benchmarks/step_profile.py --preset small --dtype float32
    python benchmarks/step_profile.py --preset small --dtype bfloat16 --attention xla --top 30

Times are thread time on XLA's worker threads, per step; two threads busy at once count twice.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile

SOURCE_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def hlo_table(hlo: str, name: str) -> dict[int, str]:
    """One of the numbered tables at the top of an HLO module's text (FileNames, StackFrames, ...)."""
    match = re.search(r"^" + name + r"\n((?:\d+ .*\n)+)", hlo, re.M)
    rows = match.group(1).splitlines() if match else []
    return {int(row.split(" ", 1)[0]): row.split(" ", 1)[1] for row in rows}


def source_lines(hlo: str) -> dict[str, str]:
    """Instruction name -> "file.py:line function" of the innermost Python frame that made it."""
    files, funcs, locations, frames = (hlo_table(hlo, name) for name in SOURCE_TABLES)

    def label(frame_id: int) -> str:
        location = locations[int(re.search(r"file_location_id=(\d+)", frames[frame_id]).group(1))]
        file_id, func_id, line = (int(re.search(key + r"=(\d+)", location).group(1))
                                  for key in ("file_name_id", "function_name_id", "line"))
        return f"{files[file_id].strip(chr(34)).split('/')[-1]}:{line} {funcs[func_id].strip(chr(34))}"

    return {m.group(1): label(int(m.group(2)))
            for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?stack_frame_id=(\d+)", hlo, re.M)}


def op_times(trace_dir: str) -> collections.Counter:
    """Total ns of each XLA op (thunk) in the profile under trace_dir, over XLA:CPU's worker threads."""
    import jax

    profile = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[-1])
    times = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" in line.name:  # XLA:CPU's intra-op threads, where the thunks run
                for event in line.events:
                    if not event.name.startswith("ThunkExecutor"):
                        times[event.name] += event.duration_ns
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--attention", choices=["auto", "xla", "tiled"], default="auto")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()

    from flax_gpt.host_memory import keep_freed_memory

    keep_freed_memory()  # as train.py does on CPU
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_gpt import GPT, preset
    from flax_gpt.devices import attention_implementation
    from flax_gpt.optim import OptimConfig, lr_schedule, make_optimizer
    from flax_gpt.train_step import init_state, make_train_step

    attention = attention_implementation(args.attention, jax.default_backend(), args.dtype,
                                         train_seq_len=args.seq_len)
    config = preset(args.preset, dtype=args.dtype, attention=attention)
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.integers(0, config.vocab_size, (1, args.batch_size, args.seq_len), dtype=np.int32))
            for _ in range(2))  # (1, B, T)
    opt_cfg = OptimConfig()
    tx = make_optimizer(opt_cfg)
    graphdef, state = init_state(GPT(config, seed=0), tx)
    train_step = make_train_step(graphdef, tx, lr_schedule(opt_cfg))
    where = source_lines(train_step.lower(state, x, y).compile().as_text())
    for _ in range(2):  # compile, then one step at speed
        state, metrics = train_step(state, x, y)
        jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                state, metrics = train_step(state, x, y)
                jax.block_until_ready(metrics)
        times = op_times(trace_dir)
    total = sum(times.values())
    by_line, by_kind = collections.Counter(), collections.Counter()
    for name, ns in times.items():
        by_line[where.get(name, "(no source line)")] += ns
        by_kind[re.sub(r"\.\d+$", "", name)] += ns
    print(f"preset {args.preset}, B={args.batch_size}, T={args.seq_len}, {args.dtype}, {attention} attention: "
          f"{total / args.steps / 1e6:.0f} ms of XLA thread time per step")
    for title, counts in (("source line", by_line), ("XLA op kind", by_kind)):
        print(f"\n| {title} | ms/step | share |\n| --- | ---: | ---: |")
        for key, ns in counts.most_common(args.top):
            print(f"| {key} | {ns / args.steps / 1e6:.1f} | {ns / total:.1%} |")


if __name__ == "__main__":
    main()
