"""The side-by-side benchmark runs end to end at test size and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
