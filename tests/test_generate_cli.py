"""`python -m flax_gpt.generate` from an HF directory: streamed samples, seeds, and clear errors."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.torch  # transformers writes the HF directory every test samples from


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 with the real vocabulary, saved as transformers would."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    path = tmp_path_factory.mktemp("hf-gpt2-tiny")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "flax_gpt.generate", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_samples_stream_with_prompt_and_repeat_per_seed(hf_dir):
    args = ("--init-from", hf_dir, "--prompt", "Hello world", "--max-new-tokens", "12", "--num-samples", "2")
    first, again = run_cli(*args, "--seed", "5"), run_cli(*args, "--seed", "5")
    assert first.returncode == 0, first.stderr[-2000:]
    samples = first.stdout.split("--- sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("Hello world") for s in samples)
    assert first.stdout == again.stdout
    assert samples[0] != samples[1]  # seeds 5 and 6


@pytest.mark.parametrize("args, message", [
    (("--prompt", "word " * 70, "--max-new-tokens", "5"), "exceeds the model's context of 64"),
    (("--num-samples", "0"), "--num-samples must be at least 1"),
    (("--top-p", "1.5", "--max-new-tokens", "5"), "0 < top_p <= 1"),
    (("--attention", "cudnn"), "--attention cudnn needs a CUDA GPU (cuDNN flash attention); this run is on cpu"),
])
def test_bad_requests_end_in_one_line(hf_dir, args, message):
    proc = run_cli("--init-from", hf_dir, *args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
