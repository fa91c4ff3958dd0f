"""The CUDA path compiled on every commit without a GPU: the gpt2 preset's train step for an H100
(benchmarks/cuda_compile.py, with the jax CUDA plugin `make cuda-plugin` installs beside the venv)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cuda_compile.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import hlo_cost  # noqa: E402

from flax_gpt import GPT, preset  # noqa: E402
from flax_gpt.metrics import flops_per_token  # noqa: E402
from flax_gpt.run_config import RUN_PRESETS  # noqa: E402


@pytest.fixture(scope="module")
def h100_train_rows(tmp_path_factory):
    """The four train-step rows for an H100 (cuDNN and XLA attention, with and without --remat); ~2 min."""
    aot = Path(os.environ.get("FLAX_GPT_CUDA_AOT", Path(sys.prefix) / "cuda-aot"))
    assert (aot / "jax_plugins").is_dir(), f"no jax CUDA plugin in {aot}: run `make cuda-plugin`"
    out = tmp_path_factory.mktemp("cuda") / "cuda_compile.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--targets", "h100", "--programs", "train_step", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    return {(r["attention"], r["remat"]): r for r in rows}


@pytest.mark.cuda_aot  # the H100 rows, compiled once for the module
def test_the_gpt2_train_step_fits_an_h100_with_headroom_at_its_micro_batch(h100_train_rows):
    run = RUN_PRESETS["gpt2"]
    assert set(h100_train_rows) == {(a, r) for a in ("cudnn", "xla") for r in (False, True)}
    for row in h100_train_rows.values():
        assert row["device"] == "NVIDIA H100 80GB HBM3" and row["dtype"] == "bfloat16"
        assert (row["micro_batch"], row["accum"]) == (run.batch_size, run.total_batch_size // (64 * 1024)) == (64, 8)
        assert row["peak_bytes"] <= 0.9 * row["device_memory_bytes"], row  # measured: 27.8 GiB of 79.6 (cuDNN)
    cudnn, xla = h100_train_rows["cudnn", False], h100_train_rows["xla", False]
    assert cudnn["peak_bytes"] < 0.85 * xla["peak_bytes"]  # measured 27.8 vs 34.7 GiB: no (B, H, T, T) scores
    for attention in ("cudnn", "xla"):  # measured 7.6 / 27.8 (cuDNN), 8.1 / 34.7 (XLA)
        assert h100_train_rows[attention, True]["peak_bytes"] < 0.35 * h100_train_rows[attention, False]["peak_bytes"]


@pytest.mark.cuda_aot  # the H100 rows, compiled once for the module
def test_cudnn_rows_hold_cudnn_fused_attention_and_xla_rows_none(h100_train_rows):
    layers = preset("gpt2").n_layer
    for (attention, remat), row in h100_train_rows.items():
        calls = row["custom_calls"]
        if attention == "cudnn":  # one per layer, or one in the loop over layers that --remat's backward pass is
            least = 1 if remat else layers
            assert calls.get("__cudnn$fmhaSoftmax", 0) >= least and calls["__cudnn$fmhaSoftmaxBackward"] >= least
        else:
            assert not [t for t in calls if "cudnn" in t], calls
        assert row["host_ops"] == [], row["host_ops"]  # no callback, transfer or CPU-only custom call


@pytest.mark.cuda_aot  # the H100 rows, compiled once for the module
def test_the_cost_counts_the_step_as_nanogpt_does(h100_train_rows):
    """FLOPs of the compiled step against nanoGPT's 6N + 12LHQT per token (which counts attention whole):
    cuDNN skips the masked half of attention and recomputes scores in its backward pass; --remat adds a forward."""
    config = preset("gpt2")
    params = nnx.state(nnx.eval_shape(lambda: GPT(config)), nnx.Param)
    n = sum(x.size for x in jax.tree.leaves(params)) - config.block_size * config.n_embd  # without wpe
    model_flops = flops_per_token(config, n, 1024) * 8 * 64 * 1024
    ratios = {k: row["flops"] / model_flops for k, row in h100_train_rows.items()}
    assert 0.90 < ratios["cudnn", False] < 0.98, ratios  # measured 0.945
    assert 1.00 < ratios["xla", False] < 1.06, ratios  # measured 1.03: softmax, LayerNorm, AdamW on top
    for attention in ("cudnn", "xla"):  # measured 1.26 both: the recomputed forward pass
        assert 1.2 < ratios[attention, True] / ratios[attention, False] < 1.35, ratios


def test_a_loop_counts_as_many_times_as_it_runs():
    """hlo_cost on a CPU program: a scan of 5 matmuls is 5x one matmul (XLA's own analysis counts the body once)."""
    def five(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]

    x, w = jnp.ones((64, 128)), jnp.ones((128, 128))
    compiled = jax.jit(five).lower(x, w).compile()
    cost = hlo_cost.program_cost(compiled.as_text())
    one_matmul = 2 * 64 * 128 * 128
    assert compiled.cost_analysis()["flops"] < 2 * one_matmul  # the loop counted once
    assert 5 * one_matmul <= cost["flops"] <= 5 * one_matmul * 1.05, cost


def test_without_the_plugin_it_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "c.json")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "FLAX_GPT_CUDA_AOT": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.startswith("error: no jax CUDA plugin") and proc.stderr.count("\n") == 1
