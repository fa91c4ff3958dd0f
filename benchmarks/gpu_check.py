"""Prove a CUDA GPU in one command: `make gpu-check` (or `python benchmarks/gpu_check.py --out gpu_check.json`).

On a CUDA machine, in one go, each step's figures into one JSON results file (and a summary printed):
  1. the parity suite with flax on the GPU (fp32 with TF32 off, bf16 against torch autocast): pytest's
     counts and every measured error from `python -m parity_tests.report`;
  2. cuDNN flash attention against XLA's on gpt2's shapes: outputs, q/k/v gradients and the model's loss;
  3. benchmarks/bench_train.py for gpt2 at 16x1024: flax XLA and cuDNN attention, torch_ref eager and
     torch.compile, MFU against the datasheet peak, peak GPU memory;
  4. 30 steps of `train.py --preset gpt2` with its default micro batch on generated tokens: tokens/s,
     MFU and peak GPU memory from its metrics.jsonl.
--dry runs the same steps on the CPU with tiny shapes (one parity test, XLA attention as the stand-in for
cuDNN, tiny presets), so the script cannot rot: tests/test_gpu_check.py runs it inside `make test`.
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
PLAN = {  # what each mode runs: the GPU proof, and its tiny stand-in on the CPU
    "gpu": {"parity": ["parity_tests"], "attention_preset": "gpt2", "attention_batch": 4,
            "bench": ["--preset", "gpt2", "--batch-size", "16", "--seq-len", "1024", "--steps", "10", "--warmup", "2",
                      "--variants", "flax-bf16", "flax-cudnn-bf16", "torch-eager-bf16", "torch-compile-bf16"],
            "train": ["--preset", "gpt2", "--max-steps", "30", "--eval-interval", "30", "--eval-batches", "2",
                      "--ckpt-interval", "1000", "--sample-tokens", "0"], "train_tokens": 524288 * 32},
    "dry": {"parity": ["parity_tests/test_flax_parity.py", "-k", "jit_matches_eager"], "attention_preset": "tiny",
            "attention_batch": 2,
            "bench": ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--steps", "2", "--warmup", "0",
                      "--variants", "flax-bf16", "torch-eager-bf16", "--device", "cpu"],
            "train": ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--total-batch-size", "64",
                      "--max-steps", "3", "--eval-interval", "3", "--eval-batches", "1", "--sample-tokens", "0",
                      "--device", "cpu"], "train_tokens": 64 * 8},
}


def run(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run cmd, echoing its output; returns its exit code, seconds and output tail."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    print(proc.stdout[-4000:], flush=True)
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
            "tail": proc.stdout[-3000:]}


def parity(plan: dict) -> dict:
    """pytest over the parity suite, then (on a GPU) the report of every measured error."""
    result = {"pytest": run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan["parity"]])}
    if plan is PLAN["gpu"]:
        report = run([sys.executable, "-m", "parity_tests.report"])
        result["report"] = report | {"table": [line for line in report["tail"].splitlines() if line.startswith("|")]}
    return result


def attention(plan: dict, dry: bool) -> dict:
    """cuDNN against XLA attention (the model's blocked XLA path stands in for cuDNN on the CPU)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import check_cudnn_attention

    from flax_gpt import preset

    config = preset(plan["attention_preset"])
    rng = np.random.default_rng(0)
    batch = tuple(rng.integers(0, config.vocab_size, (plan["attention_batch"], config.block_size), dtype=np.int32)
                  for _ in range(2))
    return check_cudnn_attention(config, batch, candidate="xla" if dry else "cudnn")


def write_tokens(folder: Path, n_train: int, n_val: int = 65536) -> None:
    """Random GPT-2 ids as nanoGPT's train.bin / val.bin (raw uint16)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rng.integers(0, 50257, n_train, dtype=np.uint16).tofile(folder / "train.bin")
    rng.integers(0, 50257, n_val, dtype=np.uint16).tofile(folder / "val.bin")


def train(plan: dict, work: Path) -> dict:
    """train.py on generated tokens; tokens/s and MFU from its metrics (median of the steps after the first)."""
    write_tokens(work / "tokens", plan["train_tokens"])
    out = work / "run"
    result = run([sys.executable, str(ROOT / "train.py"), *plan["train"], "--data", str(work / "tokens"),
                  "--out-dir", str(out), "--no-progress"], env={"FLAX_GPT_CACHE": str(work / "cache")})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    steps = [r for r in records if "tokens_per_s" in r][1:]
    if steps:
        result |= {key: float(np.median([r[key] for r in steps if r.get(key) is not None] or [np.nan]))
                   for key in ("tokens_per_s", "mfu", "ms_per_step")}
    peaks = [r["peak_device_memory_GiB"] for r in records if r.get("peak_device_memory_GiB") is not None]
    result["peak_device_memory_GiB"] = max(peaks) if peaks else None
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="the results file")
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU: check the script, measure nothing")
    args = ap.parse_args()
    import jax

    on_gpu = jax.default_backend() == "gpu"
    if not args.dry and not on_gpu:
        print("error: no CUDA GPU is visible to JAX (pip install 'flax-gpt[cuda]' on a machine with an NVIDIA "
              "driver); `--dry` checks the script on the CPU", file=sys.stderr)
        return 2
    plan = PLAN["dry" if args.dry else "gpu"]
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry": args.dry,
               "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
               "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        bench_json = Path(tmp) / "bench.json"
        results["parity"] = parity(plan)
        results["attention"] = attention(plan, args.dry)
        results["bench"] = run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), *plan["bench"],
                                "--json", str(bench_json)])
        if bench_json.is_file():
            results["bench"]["results"] = json.loads(bench_json.read_text())
        results["train"] = train(plan, Path(tmp))
    failed = [name for name in ("bench", "train") if results[name]["rc"] != 0]
    failed += ["parity"] if results["parity"]["pytest"]["rc"] != 0 else []
    failed += ["attention"] if not results["attention"]["ok"] else []
    results["failed"] = failed
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    t = results["train"]
    print(f"\ngpu-check ({'dry run on ' if args.dry else ''}{results['device']}): parity "
          f"{'passed' if 'parity' not in failed else 'FAILED'}; cuDNN vs XLA attention {results['attention']}; "
          f"train.py {t.get('tokens_per_s', float('nan')):,.0f} tokens/s, MFU {t.get('mfu') or float('nan'):.1%}, "
          f"peak device memory {t['peak_device_memory_GiB']} GiB; results in {args.out}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
