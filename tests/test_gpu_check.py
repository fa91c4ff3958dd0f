"""`make gpu-check` cannot rot: its dry mode runs every stage on the CPU with tiny shapes (real processes), and its
plan is checked at the GPU's sizes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "parity_tests" / "gpu_check.py"  # a script, not a test module: pytest does not collect it
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.torch  # its stages include the parity suite and torch_ref's benchmark
def test_the_dry_run_goes_through_every_stage_into_one_results_file(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry"] and results["failed"] == [] and results["stages"] == list(gpu_check.STAGES)
    assert results["env"]["backend"] == "cpu" and results["env"]["jax"] and results["env"]["torch"]
    assert results["parity"]["pytest"]["rc"] == 0 and " passed" in results["parity"]["pytest"]["tail"]
    assert results["attention"]["ok"] and results["attention"]["model_grad_rel"] == 0.0  # XLA stands in for cuDNN
    assert set(results["bench"]["results"]["variants"]) == {"flax-bf16", "torch-eager-bf16"}
    assert results["train"]["rc"] == 0 and results["train"]["tokens_per_s"] > 0
    assert "gpu-check (dry run on cpu): env ok, attention ok, parity ok, bench ok, train ok" in proc.stdout


def test_the_gpu_plan_fits_the_budget_and_its_data_holds_its_batches():
    plan = gpu_check.PLANS["gpu"]
    assert gpu_check.check_plan(plan) == []
    assert sum(stage["seconds"] for stage in plan.values()) <= gpu_check.BUDGET_S
    assert {k: plan["train"][k] for k in gpu_check.GPT2_RUN} == gpu_check.GPT2_RUN  # the preset's own micro batch
    n_train, n_val = gpu_check.train_tokens(plan["train"])
    assert n_val == 2 * 64 * 1024 + 1 and n_train == 10 * 524288 + 1


def test_the_plan_catches_too_few_validation_tokens(monkeypatch):
    """65,536 val tokens for one 64x1024 eval batch: one short of the targets' shift (what train.py would refuse)."""
    monkeypatch.setattr(gpu_check, "train_tokens", lambda train: (10 * 524288 + 1, 65536))
    plan = {**gpu_check.PLANS["gpu"], "train": {**gpu_check.PLANS["gpu"]["train"], "eval_batches": 1}}
    (problem,) = gpu_check.check_plan(plan)
    assert problem.startswith("train stage, val tokens: ") and "65536" in problem.replace(",", ""), problem


def test_plan_prints_the_stages_and_runs_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:6]] == list(gpu_check.STAGES)
    assert "64x1024 x 8 micro batches" in proc.stdout and "131,073 val tokens" in proc.stdout
    assert not (tmp_path / "r.json").exists()


def test_each_stage_lands_in_the_results_file_as_it_finishes(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--stages", "env", "attention", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["stages"] == ["env", "attention"] and "parity" not in results and results["attention"]["ok"]


def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA GPU") and proc.stderr.count("\n") == 1
    assert json.loads(out.read_text())["env"]["backend"] == "cpu"  # what it found is kept


def test_stages_past_the_budget_are_not_run_and_the_run_fails(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--stages", "env", "attention", "--budget-s", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["not_run"] == ["env", "attention"] and "env" not in results
    assert "env NOT RUN, attention NOT RUN" in proc.stdout
