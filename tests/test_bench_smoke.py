"""The side-by-side benchmark runs end to end at test size, and what it reports holds together."""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOSS_REL = 1e-6  # the parity table's loss bound (parity_tests/checks.py LOSS_REL): same weights, same batch
TRAJECTORY_REL = 2e-6  # the parity table's training-trajectory bound (parity_tests/checks.py); measured here 8.8e-8


def load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.torch  # benchmarks torch_ref beside flax
def test_bench_train_smoke(tmp_path):
    """Tokens/s agree with ms/step and the batch the test asked for; flax and torch train the same model alike."""
    out, (B, T, warmup, steps) = tmp_path / "bench.json", (2, 16, 1, 2)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--preset", "tiny", "--batch-size", str(B),
         "--seq-len", str(T), "--steps", str(steps), "--warmup", str(warmup), "--threads", "1",
         "--variants", "flax-fp32", "torch-eager-fp32", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    wall_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    variants = json.loads(out.read_text())["variants"]
    for name, r in variants.items():
        assert r["tok_s"] * r["median_ms"] / 1e3 == pytest.approx(B * T, rel=1e-9), name
        assert 0 < steps * r["median_ms"] / 1e3 < wall_s, name
        assert len(r["losses"]) == 1 + warmup + steps and all(map(math.isfinite, r["losses"])), name
        assert r["losses"][-1] < r["losses"][0], name  # it trains: the same batch again, a lower loss
    assert 0 < variants["flax-fp32"]["host_overhead"] < 1
    flax, torch = variants["flax-fp32"]["losses"], variants["torch-eager-fp32"]["losses"]
    assert abs(flax[0] - torch[0]) <= LOSS_REL * abs(torch[0])  # same init, same batch
    worst = max(abs(a - b) / abs(b) for a, b in zip(flax, torch))
    print(f"flax vs torch per-step loss, worst relative {worst:.2e}")
    assert worst <= TRAJECTORY_REL  # same schedule and updates
    assert "| flax-fp32 |" in proc.stdout


def _fake_cudnn(error: str):
    """jax.nn.dot_product_attention whose implementation="cudnn" runs XLA's in float32, rounded to the inputs'
    dtype; with error="non-causal" it also drops the causal mask (a bug the check must catch)."""
    real = jax.nn.dot_product_attention

    def attention(q, k, v, *args, implementation=None, is_causal=False, **kwargs):
        if implementation != "cudnn":
            return real(q, k, v, *args, implementation=implementation, is_causal=is_causal, **kwargs)
        causal = is_causal and error != "non-causal"
        y = real(*(a.astype(np.float32) for a in (q, k, v)), *args, implementation="xla", is_causal=causal, **kwargs)
        return y.astype(q.dtype)  # (B, T, nh, hs)

    return attention


@pytest.mark.parametrize("error", ("none", "non-causal"))
def test_the_cudnn_attention_check_passes_an_equal_attention_and_fails_a_wrong_one(monkeypatch, error):
    """The GPU's cuDNN check, on the CPU with a stand-in for cuDNN: an XLA attention computed in float32 and
    rounded to bf16 passes; a non-causal one fails, on the attention alone and in the model's gradients."""
    from flax_gpt import preset

    bench = load_bench_train()
    monkeypatch.setattr(jax.nn, "dot_product_attention", _fake_cudnn(error))
    config = preset("tiny", vocab_size=128)  # a small lm_head: the check's four compilations take half the time
    batch = tuple(np.random.default_rng(0).integers(0, config.vocab_size, (2, 16), dtype=np.int32) for _ in range(2))
    check = bench.check_cudnn_attention(config, batch)
    assert check["output_rel"] > 0  # the stand-in ran: bf16 attention computed in float32 differs a little
    if error == "none":
        assert check["ok"] and max(check["output_rel"], check["grad_rel"], check["model_grad_rel"]) <= bench.CUDNN_REL_BOUND
    else:
        assert not check["ok"] and min(check["output_rel"], check["grad_rel"], check["model_grad_rel"]) > bench.CUDNN_REL_BOUND
