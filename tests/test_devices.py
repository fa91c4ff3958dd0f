"""Apple GPUs through jax-mps, checked on the CPU: the platform's fallbacks forced here, the metal extra's markers."""

import json
import platform
import sys
import tomllib
from types import SimpleNamespace
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from flax_gpt import devices
from flax_gpt.errors import UserError
from flax_gpt.run_config import TrainConfig
from flax_gpt.train import run
from train_runs import corpus_text

ROOT = Path(__file__).resolve().parents[1]

# macOS 14 on Apple silicon, as the markers see it (packaging's names)
MAC = {**default_environment(), "sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64",
       "os_name": "posix", "python_version": "3.12", "python_full_version": "3.12.4"}


def metal_extra() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"]["metal"]]


def test_the_cuda_extra_is_jax_for_cuda_13_over_this_package_s_jax_range():
    """CUDA 13 as PyPI's torch (>= 2.11) is, so that the two share one nvidia-cudnn-cu13; the same jax range as
    the CPU install, so that `pip install 'flax-gpt[cuda]'` tests what CI tests."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (cuda,) = [Requirement(r) for r in project["optional-dependencies"]["cuda"]]
    (core,) = [r for r in map(Requirement, project["dependencies"]) if r.name == "jax"]
    assert (cuda.name, cuda.extras, cuda.specifier) == ("jax", {"cuda13"}, core.specifier)


def test_the_metal_extra_is_jax_mps_for_apple_silicon_only():
    (req,) = metal_extra()
    assert req.name == "jax-mps"
    assert req.marker.evaluate(MAC)
    assert not req.marker.evaluate({**MAC, "sys_platform": "linux", "platform_system": "Linux",
                                    "platform_machine": "x86_64"})  # a Linux machine as this project's CI
    here = sys.platform == "darwin" and platform.machine() == "arm64" and sys.version_info >= (3, 11)
    assert req.marker.evaluate() == here  # this machine, judged by the markers alone
    assert not req.marker.evaluate({**MAC, "platform_machine": "x86_64"})  # an Intel Mac: no Apple GPU
    assert not req.marker.evaluate({**MAC, "python_version": "3.10"})  # jax-mps needs Python 3.11+


def test_the_metal_extra_pairs_jax_mps_with_the_jax_this_package_takes():
    """jax-mps x.y.* requires jax x.y.*: its range must not leave this package's jax range."""
    (req,) = metal_extra()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    jax = next(Requirement(r) for r in project["dependencies"] if r.startswith("jax"))
    assert "0.10.11" in req.specifier and "0.10.0" not in req.specifier  # 0.10.11: the release whose source was read
    for minor in ("0.9.14", "0.11.1"):  # the neighbours, paired with jax 0.9 and 0.11
        assert minor not in req.specifier
    assert "0.10.2" in jax.specifier  # a jax 0.10, which jax-mps 0.10.* is built for


def test_capabilities_of_each_platform():
    assert devices.capabilities("mps") == devices.Capabilities(donation=False, matmul_output="compute",
                                                               cudnn_attention=False)
    assert devices.capabilities("cpu") == devices.Capabilities()
    assert devices.capabilities("gpu").cudnn_attention and devices.capabilities("gpu").donation
    assert devices.capabilities("cpu").fallbacks() == []
    assert devices.capabilities("mps").fallbacks() == ["no buffer donation", "bf16 matmuls return bf16, cast to float32"]


def test_attention_auto_is_cudnn_on_cuda_in_bf16_tiled_when_training_on_cpu_and_xla_elsewhere(monkeypatch):
    monkeypatch.setattr(devices, "gpu_compute_capability", lambda devices=None: 9.0)  # an H100
    pick = devices.attention_implementation
    assert pick("auto", "gpu", "bfloat16") == "cudnn"
    assert pick("auto", "cpu", "float32", train_seq_len=256) == pick("auto", "cpu", "bfloat16", train_seq_len=1024) == "tiled"
    assert [pick("auto", p, d, train_seq_len=256) for p, d in (("gpu", "float32"), ("mps", "bfloat16"), ("cpu", "float16"))] == ["xla"] * 3
    assert pick("auto", "cpu", "float32", dropout=0.1, train_seq_len=256) == "xla"  # dropout on the probabilities is XLA's
    assert pick("auto", "cpu", "float32", train_seq_len=128) == pick("auto", "cpu", "float32") == "xla"  # short, not training
    assert pick("tiled", "gpu", "bfloat16") == "tiled"
    with pytest.raises(UserError, match=r"^--attention tiled has no dropout, .* use --attention xla"):
        pick("tiled", "cpu", "float32", dropout=0.1)
    with pytest.raises(UserError, match=r"^--attention tiled computes in fp32 or bf16, this run in float16"):
        pick("tiled", "cpu", "float16")
    assert pick("xla", "gpu", "bfloat16") == "xla" and pick("cudnn", "gpu", "bfloat16") == "cudnn"
    with pytest.raises(UserError, match=r"^--attention cudnn needs a CUDA GPU .* on mps: use --attention xla"):
        pick("cudnn", "mps", "bfloat16")
    with pytest.raises(UserError, match=r"^--attention cudnn runs in bf16 or fp16 only .* add --dtype bf16"):
        pick("cudnn", "gpu", "float32")
    assert pick("auto", "gpu", "bfloat16", dropout=0.1) == "xla"  # cuDNN's dropout seed is fixed at compile time
    with pytest.raises(UserError, match=r"^--attention cudnn cannot drop out with --dropout 0.1: .* --attention xla"):
        pick("cudnn", "gpu", "bfloat16", dropout=0.1)



def test_fp16_takes_cudnn_attention_only_where_cudnn_runs_it(monkeypatch):
    monkeypatch.setattr(devices, "gpu_compute_capability", lambda devices=None: 8.9)
    assert devices.attention_implementation("cudnn", "gpu", "float16") == "cudnn"
    assert devices.attention_implementation("auto", "gpu", "float16") == "xla"  # auto: cuDNN in bf16 only
    monkeypatch.setattr(devices, "gpu_compute_capability", lambda devices=None: 7.5)  # a T4
    with pytest.raises(UserError, match=r"^--attention cudnn: cuDNN flash attention needs compute capability 8.0 or "
                                         r"newer, this GPU has 7.5: use --attention xla"):
        devices.attention_implementation("cudnn", "gpu", "float16")


def test_dtype_auto_is_bf16_on_gpus_that_have_it_and_fp16_training_below_compute_capability_8(monkeypatch):
    t4, a100 = SimpleNamespace(compute_capability="7.5"), SimpleNamespace(compute_capability="8.0")
    for gpus, want in (([a100], ["bfloat16"] * 2), ([t4], ["float16", "float32"]),
                       ([a100, t4], ["float16", "float32"])):  # (training, evaluating)
        monkeypatch.setattr("jax.local_devices", lambda gpus=gpus: gpus)
        assert [devices.compute_dtype("auto", "gpu", training) for training in (True, False)] == want
        assert devices.compute_dtype("bf16", "gpu") == "bfloat16"  # asked for: the user's choice stands
        assert devices.compute_dtype("fp16", "gpu") == "float16"
    assert devices.auto_dtype_note("auto", "gpu") == ("--dtype auto trains in float16 with dynamic loss scaling: this "
                                                      "GPU (compute capability 7.5) has no bf16")
    assert devices.auto_dtype_note("bf16", "gpu") is None and devices.auto_dtype_note("auto", "cpu") is None
    assert devices.auto_dtype_note("auto", "gpu", [a100]) is None


def test_device_metal_without_the_plugin_names_jax_mps(monkeypatch):
    monkeypatch.setattr(devices, "has_metal_plugin", lambda: False)  # as on this project's Linux machines
    with pytest.raises(UserError, match=r"^--device metal needs the jax-mps plugin .*pip install 'flax-gpt\[metal\]'$"):
        devices.select_device("metal")


def test_a_run_on_jax_mps_takes_its_fallbacks(tmp_path, monkeypatch, capsys):
    """train.run with JAX's platform reported as mps (the CPU computes): the train step does not donate, the
    samples' decode steps do not donate the cache, matmuls return bf16; it trains. (The fallbacks' numbers against
    the normal path: parity_tests' matmul fallback check and test_train_step's step without donation.)"""
    from flax_gpt import generate, run_setup, train_step

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    donated = []
    make_train_step = train_step.make_train_step
    monkeypatch.setattr(train_step, "make_train_step",
                        lambda *a, **k: donated.append(k.get("donate", True)) or make_train_step(*a, **k))
    configs = []
    init_train_state = run_setup.init_train_state
    monkeypatch.setattr(run_setup, "init_train_state",
                        lambda *a, **k: (lambda r: configs.append(r[0]) or r)(init_train_state(*a, **k)))
    monkeypatch.setattr(devices, "current_platform", lambda: "mps")
    copying_steps = generate._step_jit_copying._cache_size()
    run(TrainConfig(preset="tiny", data="corpus.txt", batch_size=2, seq_len=16, max_steps=3, eval_interval=3,
                    eval_batches=1, sample_tokens=4, progress=False, out_dir="mps"))  # dtype auto: bf16 off the CPU
    out = capsys.readouterr().out
    assert "dtype bfloat16, xla attention on mps" in out
    assert "mps falls back to: no buffer donation, bf16 matmuls return bf16, cast to float32" in out
    assert donated == [False] and [c.matmul_output for c in configs] == ["compute"]
    assert generate._step_jit_copying._cache_size() == copying_steps + 1  # compiled for the samples, and used
    records = [json.loads(line) for line in (tmp_path / "mps" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses  # measured: 10.8406 -> 10.7363


def test_a_cpu_run_with_tiled_attention_trains_and_says_so(tmp_path, monkeypatch, capsys):
    """--attention tiled on the CPU: the model line names it, and the run trains."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    run(TrainConfig(preset="tiny", data="corpus.txt", batch_size=2, seq_len=32, max_steps=3, eval_interval=3,
                    eval_batches=1, sample_tokens=4, progress=False, out_dir="tiled", attention="tiled"))
    assert "tiled attention on cpu" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "tiled" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses  # measured: 10.8297 -> 10.6661


def test_cpu_info_reads_the_model_and_the_matmul_isa_flags(tmp_path):
    """What bench_train's header and --dtype auto read: an Intel AMX host, an AMD EPYC, an AVX2-only CPU, no file."""
    def cpuinfo(model, flags):
        path = tmp_path / model.split()[0]
        path.write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
        return str(path)

    intel = cpuinfo("Intel(R) Xeon(R) Platinum 8480+", "fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
    amd = cpuinfo("AMD EPYC", "fpu avx2 avx512f avx512_bf16 avx512_vnni")
    old = cpuinfo("Haswell", "fpu avx2 fma")
    assert devices.cpu_info(intel) == {"model": "Intel(R) Xeon(R) Platinum 8480+",
                                       "isa": ["amx_bf16", "amx_tile", "avx512_bf16", "avx512f"]}
    assert devices.cpu_info(amd) == {"model": "AMD EPYC", "isa": ["avx512_bf16", "avx512f"]}
    assert devices.cpu_info(old)["isa"] == [] and not devices.cpu_has_bf16_dots(old)
    assert devices.cpu_line(devices.cpu_info(amd)) == "AMD EPYC (avx512_bf16, avx512f)"
    assert devices.cpu_line(devices.cpu_info(old)) == "Haswell (no AVX-512)"
    assert devices.cpu_has_bf16_dots(intel) and devices.cpu_has_bf16_dots(amd)
    missing = devices.cpu_info(str(tmp_path / "none"))
    assert missing["model"] and missing["isa"] == []
