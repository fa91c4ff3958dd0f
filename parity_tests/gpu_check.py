"""Prove a CUDA GPU in one command: `make gpu-check` (or `python parity_tests/gpu_check.py --out gpu_check.json`).

Five stages, each in its own process, each writing its result into the results file as it finishes (a run cut
short keeps what it measured):
  1. env        GPU name, driver, memory; jax, jaxlib, cuDNN, torch and CUDA versions;
  2. attention  cuDNN flash attention against XLA's on gpt2's shapes: outputs, q/k/v gradients, the model's loss;
  3. parity     the parity suite's core with flax on the GPU: logits, loss, gradients (fp32 with TF32 off, bf16
                against torch autocast) and one AdamW step;
  4. bench      benchmarks/bench_train.py at gpt2 16x1024: flax with XLA and cuDNN attention, torch_ref eager and
                torch.compile; MFU against the datasheet peak, peak GPU memory;
  5. train      a short `train.py --preset gpt2` at its own micro batch and accumulation on generated tokens.
The parent process never starts JAX, so no stage finds the GPU's memory held by another; stages that put torch
and JAX in one process run with JAX's preallocation off. `--plan` prints the stages, their shapes, token counts
and expected times and checks that each stage's data holds its batches (the dry run checks the GPU plan too);
`--stages` runs some; `--dry` runs every stage on the CPU with tiny shapes (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "attention", "parity", "bench", "train")
PARITY_CORE = ["parity_tests/test_flax_parity.py", "parity_tests/test_optim_parity.py", "-k",
               "logits_match_transformers or loss_matches_transformers or gradients_match_torch_ref or "
               "bf16_matches_torch_autocast or bf16_gradients_match_torch_autocast or one_adamw_step_matches_torch_ref"]
GPT2_RUN = dict(preset="gpt2", batch_size=64, seq_len=1024, total_batch_size=524288)  # train.py's gpt2 preset
PLANS = {  # what each mode runs; seconds: expected time, on the GPU as one H100 took (2026-12-06), rounded up
    "gpu": {
        "env": {"seconds": 10},
        "attention": {"preset": "gpt2", "batch_size": 4, "seconds": 90},
        "parity": {"pytest": PARITY_CORE, "seconds": 170},
        "bench": {"preset": "gpt2", "batch_size": 16, "seq_len": 1024, "steps": 10, "warmup": 2, "seconds": 180,
                  "variants": ["flax-xla-bf16", "flax-cudnn-bf16", "torch-eager-bf16", "torch-compile-bf16"]},
        "train": {**GPT2_RUN, "max_steps": 10, "eval_batches": 2, "seconds": 50},
    },
    "dry": {
        "env": {"seconds": 10},
        "attention": {"preset": "tiny", "batch_size": 2, "seconds": 20},
        "parity": {"pytest": ["parity_tests/test_flax_parity.py", "-k", "jit_matches_eager"], "seconds": 30},
        "bench": {"preset": "tiny", "batch_size": 2, "seq_len": 32, "steps": 2, "warmup": 0, "seconds": 40,
                  "variants": ["flax-bf16", "torch-eager-bf16"]},
        "train": {"preset": "tiny", "batch_size": 2, "seq_len": 32, "total_batch_size": 64, "max_steps": 3,
                  "eval_batches": 1, "seconds": 40},
    },
}
BUDGET_S = 9 * 60  # the whole GPU proof, compiles included
NO_PREALLOCATION = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # JAX beside torch in one process


def train_tokens(train: dict) -> tuple[int, int]:
    """(train, val) token counts the train stage writes: every step's tokens and every eval batch, plus the one
    target past the last window."""
    per_step = train["total_batch_size"]
    return train["max_steps"] * per_step + 1, train["eval_batches"] * train["batch_size"] * train["seq_len"] + 1


def check_plan(plan: dict) -> list[str]:
    """Problems with a plan's data, found by flax_gpt.data's own checks on arrays of the planned sizes."""
    from flax_gpt import data
    from flax_gpt.errors import UserError

    train = plan["train"]
    n_train, n_val = train_tokens(train)
    problems = []
    for what, check in (
            ("train", lambda: data.DataLoader(np.zeros(n_train, np.uint16), train["batch_size"], train["seq_len"])),
            ("val", lambda: data.eval_batches(np.zeros(n_val, np.uint16), train["batch_size"], train["seq_len"],
                                              train["eval_batches"]))):
        try:
            check()
        except UserError as e:
            problems.append(f"train stage, {what} tokens: {e}")
    if train["total_batch_size"] % (train["batch_size"] * train["seq_len"]):
        problems.append("train stage: total_batch_size is not a multiple of batch_size * seq_len")
    return problems


def stage_summary(name: str, s: dict) -> str:
    """What one stage of a plan runs, in a line: its shapes and token counts."""
    if name == "env":
        return "versions and the device"
    if name == "attention":
        return f"cuDNN vs XLA attention, {s['preset']} {s['batch_size']}x(block size)"
    if name == "parity":
        return "pytest " + " ".join(s["pytest"])
    if name == "bench":
        return (f"{s['preset']} {s['batch_size']}x{s['seq_len']}, {s['warmup']} warm-up + {s['steps']} rounds of "
                f"{', '.join(s['variants'])}")
    n_train, n_val = train_tokens(s)
    accum = s["total_batch_size"] // (s["batch_size"] * s["seq_len"])
    return (f"train.py --preset {s['preset']}: {s['batch_size']}x{s['seq_len']} x {accum} micro batches, "
            f"{s['max_steps']} steps, {s['eval_batches']} eval batches; writes {n_train:,} train and {n_val:,} val "
            "tokens")


def describe(plan: dict, stages: list[str]) -> str:
    """The plan as lines: each stage's shapes, tokens and expected seconds, and the total against the budget."""
    lines = [f"  {name:9} ~{plan[name]['seconds']:>3} s  {stage_summary(name, plan[name])}" for name in stages]
    total = sum(plan[name]["seconds"] for name in stages)
    lines.append(f"  expected {total} s of a {BUDGET_S} s budget (one H100's times)")
    return "\n".join(lines)


def run(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run cmd in its own process, echoing its output; its exit code, seconds and output tail."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
        rc, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:  # its output comes back as bytes even with text=True
        rc, out = 124, (e.stdout or b"").decode(errors="replace")
    print(out[-4000:], flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1), "tail": out[-3000:]}


# ----------------------------------------------------------------------------- stages, each in its own process


def env_stage(_: dict) -> dict:
    """Versions and the device, as JAX and torch see them."""
    import jax

    result = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "device_count": jax.device_count()}
    try:
        from jax._src.lib import cuda_versions
        result["jax_cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except (ImportError, AttributeError, RuntimeError):
        result["jax_cudnn"] = None
    try:
        import torch
        result |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                   "torch_cudnn": torch.backends.cudnn.version(), "torch_sees_gpu": torch.cuda.is_available()}
    except ImportError:
        result["torch"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        result["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        result["nvidia_smi"] = None
    return result


def attention_stage(stage: dict) -> dict:
    """cuDNN against XLA attention (XLA's own path stands in for cuDNN on the CPU)."""
    import jax

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import check_cudnn_attention

    from flax_gpt import preset

    config = preset(stage["preset"])
    rng = np.random.default_rng(0)
    batch = tuple(rng.integers(0, config.vocab_size, (stage["batch_size"], config.block_size), dtype=np.int32)
                  for _ in range(2))
    return check_cudnn_attention(config, batch, candidate="cudnn" if jax.default_backend() == "gpu" else "xla")


IN_PROCESS = {"env": env_stage, "attention": attention_stage}


def run_stage(name: str, plan: dict, dry: bool, work: Path, left_s: float = float("inf")) -> dict:
    """One stage in its own process, stopped after 3x its expected seconds or when the budget left runs out."""
    stage = plan[name]
    timeout = min(3 * stage["seconds"], left_s)  # a hung stage must not take the next stages' time
    if name in IN_PROCESS:
        out = work / f"{name}.json"
        result = run([sys.executable, __file__, "--stage-worker", name, "--stage-out", str(out)]
                     + (["--dry"] if dry else []), env=NO_PREALLOCATION, timeout=timeout)
        return result | (json.loads(out.read_text()) if out.is_file() else {"ok": False})
    if name == "parity":
        return {"pytest": run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *stage["pytest"]],
                              env=NO_PREALLOCATION, timeout=timeout)}
    if name == "bench":
        bench_json = work / "bench.json"
        result = run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--preset", stage["preset"],
                      "--batch-size", str(stage["batch_size"]), "--seq-len", str(stage["seq_len"]),
                      "--steps", str(stage["steps"]), "--warmup", str(stage["warmup"]), "--variants",
                      *stage["variants"], "--json", str(bench_json)] + (["--device", "cpu"] if dry else []),
                     env=NO_PREALLOCATION, timeout=timeout)
        return result | ({"results": json.loads(bench_json.read_text())} if bench_json.is_file() else {})
    return train_stage(stage, dry, work, timeout)


def write_tokens(folder: Path, n_train: int, n_val: int) -> None:
    """Random GPT-2 ids as nanoGPT's train.bin / val.bin (raw uint16)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rng.integers(0, 50257, n_train, dtype=np.uint16).tofile(folder / "train.bin")
    rng.integers(0, 50257, n_val, dtype=np.uint16).tofile(folder / "val.bin")


def train_stage(stage: dict, dry: bool, work: Path, timeout: float) -> dict:
    """train.py on generated tokens (alone on the GPU: JAX preallocates); tokens/s and MFU from its metrics
    (median of the steps after the first)."""
    write_tokens(work / "tokens", *train_tokens(stage))
    out = work / "run"
    flags = ["--preset", stage["preset"], "--batch-size", str(stage["batch_size"]), "--seq-len", str(stage["seq_len"]),
             "--total-batch-size", str(stage["total_batch_size"]), "--max-steps", str(stage["max_steps"]),
             "--eval-interval", str(stage["max_steps"]), "--eval-batches", str(stage["eval_batches"]),
             "--ckpt-interval", "100000", "--sample-tokens", "0", "--data", str(work / "tokens"),
             "--out-dir", str(out), "--no-progress"] + (["--device", "cpu"] if dry else [])
    result = run([sys.executable, str(ROOT / "train.py"), *flags], env={"FLAX_GPT_CACHE": str(work / "cache")},
                 timeout=timeout)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    steps = [r for r in records if "tokens_per_s" in r][1:]
    if steps:
        result |= {key: float(np.median([r[key] for r in steps if r.get(key) is not None] or [np.nan]))
                   for key in ("tokens_per_s", "mfu", "ms_per_step")}
    peaks = [r["peak_device_memory_GiB"] for r in records if r.get("peak_device_memory_GiB") is not None]
    result["peak_device_memory_GiB"] = max(peaks) if peaks else None
    return result


def stage_failed(name: str, result: dict) -> bool:
    """Whether a stage's result is a failure."""
    if name == "parity":
        return result["pytest"]["rc"] != 0
    if name == "attention":
        return result.get("rc", 0) != 0 or not result.get("ok")
    return result.get("rc", 0) != 0


def stage_word(name: str, results: dict) -> str:
    """ok, FAILED or NOT RUN (the budget ran out before it)."""
    return "NOT RUN" if name in results["not_run"] else "FAILED" if name in results["failed"] else "ok"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="the results file, rewritten as each stage finishes")
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU: check the script, measure nothing")
    ap.add_argument("--plan", action="store_true", help="print the stages and check their data; run nothing")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="stop the stage running when this many seconds have passed; later stages are not run")
    ap.add_argument("--stage-worker", choices=list(IN_PROCESS), help=argparse.SUPPRESS)
    ap.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mode = "dry" if args.dry else "gpu"
    plan = PLANS[mode]
    if args.stage_worker:
        Path(args.stage_out).write_text(json.dumps(IN_PROCESS[args.stage_worker](plan[args.stage_worker])))
        return 0
    problems = check_plan(PLANS["gpu"]) + (check_plan(plan) if args.dry else [])  # the dry run checks the GPU plan
    print(f"gpu-check plan ({mode}):\n{describe(plan, args.stages)}", flush=True)
    if problems:
        print(f"error: the gpu-check plan does not hold: {'; '.join(problems)}", file=sys.stderr)
        return 2
    if args.plan:
        return 0
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry": args.dry, "mode": mode,
               "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores", "stages": args.stages,
               "failed": [], "not_run": []}
    deadline = time.time() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in args.stages:
            left_s = deadline - time.time()
            if left_s < 5:
                results["not_run"].append(name)
                continue
            results[name] = run_stage(name, plan, args.dry, Path(tmp), left_s)
            if stage_failed(name, results[name]):
                results["failed"].append(name)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
            if name == "env" and not args.dry and results["env"].get("backend") != "gpu":
                print("error: no CUDA GPU is visible to JAX (pip install 'flax-gpt[cuda]' on a machine with an NVIDIA "
                      "driver); `--dry` checks the script on the CPU", file=sys.stderr)
                return 2
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    t = results.get("train", {})
    print(f"\ngpu-check ({'dry run on ' if args.dry else ''}{results.get('env', {}).get('device', '?')}): "
          f"{', '.join(f'{n} ' + stage_word(n, results) for n in args.stages)}; "
          f"train.py {t.get('tokens_per_s', float('nan')):,.0f} tokens/s, MFU {t.get('mfu') or float('nan'):.1%}, "
          f"peak device memory {t.get('peak_device_memory_GiB')} GiB; results in {args.out}")
    return 1 if results["failed"] or results["not_run"] else 0


if __name__ == "__main__":
    sys.exit(main())
