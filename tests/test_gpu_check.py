"""`make gpu-check` cannot rot: its dry mode runs every step on the CPU with tiny shapes (a real process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.torch  # its steps include the parity suite and torch_ref's benchmark
def test_the_dry_run_goes_through_every_step_into_one_results_file(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry"] and results["failed"] == []
    assert results["parity"]["pytest"]["rc"] == 0 and " passed" in results["parity"]["pytest"]["tail"]
    assert results["attention"]["ok"] and results["attention"]["model_grad_rel"] == 0.0  # XLA stands in for cuDNN
    assert set(results["bench"]["results"]["variants"]) == {"flax-bf16", "torch-eager-bf16"}
    assert results["train"]["rc"] == 0 and results["train"]["tokens_per_s"] > 0
    assert "gpu-check (dry run on cpu)" in proc.stdout


def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "r.json")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA GPU") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
