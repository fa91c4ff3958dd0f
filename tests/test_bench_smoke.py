"""The side-by-side benchmark runs end to end at test size and writes its JSON."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--preset", "tiny", "--batch-size", "2",
         "--seq-len", "16", "--steps", "2", "--warmup", "0", "--variants", "flax-fp32", "torch-eager-fp32",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["flax_tok_s"] > 0 and result["torch_eager_tok_s"] > 0
    assert result["flax_over_torch_fp32"] == result["flax_tok_s"] / result["torch_eager_tok_s"]
    assert 0 < result["variants"]["flax-fp32"]["host_overhead"] < 1
    assert result["best_over_best"] == result["flax_over_torch_fp32"]  # one variant each: the same ratio
    assert "| flax-fp32 |" in proc.stdout


def test_attention_check_runs_and_passes_xla_against_itself():
    """The GPU's cuDNN check, with XLA standing in for cuDNN on CPU: the code path runs and finds no difference."""
    from flax_gpt import preset

    bench = load_bench_train()
    config = preset("tiny")
    batch = tuple(np.random.default_rng(0).integers(0, config.vocab_size, (2, 16), dtype=np.int32) for _ in range(2))
    check = bench.check_cudnn_attention(config, batch, candidate="xla")
    assert check["ok"] and check["output_rel"] == 0 and check["grad_rel"] == 0
    assert check["model_loss_cudnn"] == check["model_loss_xla"] > 0
