"""Apple GPUs through jax-mps, checked on the CPU: the platform's fallbacks forced here, the metal extra's markers."""

import json
import platform
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from flax_gpt import devices
from flax_gpt.errors import UserError
from flax_gpt.train import TrainConfig, run
from train_runs import corpus_text

ROOT = Path(__file__).resolve().parents[1]
BF16_REL = 2e-2  # the bf16 parity bound (parity_tests/checks.py)

# macOS 14 on Apple silicon, as the markers see it (packaging's names)
MAC = {**default_environment(), "sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64",
       "os_name": "posix", "python_version": "3.12", "python_full_version": "3.12.4"}


def metal_extra() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"]["metal"]]


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
    assert "0.10.2" in jax.specifier and "0.11.0" not in jax.specifier


def test_the_resolution_check_refuses_a_missing_plugin_or_a_jax_it_does_not_take():
    """`make metal-resolve`'s check, offline on made-up resolutions (the real one needs PyPI)."""
    from check_metal_resolution import check

    jax_range = Requirement("jax>=0.6,<0.11")
    good = "flax==0.12.8\njax==0.10.2\njax-mps==0.10.11\njaxlib==0.10.2\n"
    assert check(good, jax_range) == "jax-mps==0.10.11 jax==0.10.2 jaxlib==0.10.2"
    for bad, why in ((good.replace("jax-mps==0.10.11\n", "jax-metal==0.1.1\n"), "jax-mps is missing"),
                     (good.replace("jax==0.10.2", "jax==0.9.2"), "jax 0.9.2 does not go with jax-mps 0.10.11"),
                     (good.replace("jax==0.10.2", "jax==0.11.0").replace("jax-mps==0.10.11", "jax-mps==0.11.1"),
                      "jax 0.11.0 does not go")):
        with pytest.raises(SystemExit, match=why):
            check(bad, jax_range)


def test_capabilities_of_each_platform():
    assert devices.capabilities("mps") == devices.Capabilities(donation=False, matmul_output="compute",
                                                               cudnn_attention=False)
    assert devices.capabilities("cpu") == devices.Capabilities()
    assert devices.capabilities("gpu").cudnn_attention and devices.capabilities("gpu").donation
    assert devices.capabilities("cpu").fallbacks() == []
    assert devices.capabilities("mps").fallbacks() == ["no buffer donation", "bf16 matmuls return bf16, cast to float32"]


def test_device_metal_without_the_plugin_names_jax_mps(monkeypatch):
    monkeypatch.setattr(devices, "has_metal_plugin", lambda: False)  # as on this project's Linux machines
    with pytest.raises(UserError, match=r"^--device metal needs the jax-mps plugin .*pip install 'flax-gpt\[metal\]'$"):
        devices.select_device("metal")


def losses_of(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_a_run_on_jax_mps_takes_its_fallbacks_and_trains_alike(tmp_path, monkeypatch, capsys):
    """train.run with JAX's platform reported as mps (the CPU computes): no donation, bf16-out matmuls, and the
    losses of a bf16 run on the CPU's own path within the bf16 bound (measured: 1.5e-5), not bit-equal."""
    from flax_gpt import generate, train_step

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    donated = []
    make_train_step = train_step.make_train_step
    monkeypatch.setattr(train_step, "make_train_step",
                        lambda *a, **k: donated.append(k.get("donate", True)) or make_train_step(*a, **k))
    flags = dict(preset="tiny", data="corpus.txt", batch_size=2, seq_len=16, max_steps=3, eval_interval=3,
                 eval_batches=1, progress=False)
    run(TrainConfig(**flags, out_dir="cpu", dtype="bf16", sample_tokens=0))  # sampling leaves the losses alone
    monkeypatch.setattr(devices, "current_platform", lambda: "mps")
    run(TrainConfig(**flags, out_dir="mps", sample_tokens=4))  # dtype auto: bf16 off the CPU
    out = capsys.readouterr().out
    assert "dtype bfloat16 on mps" in out
    assert "mps falls back to: no buffer donation, bf16 matmuls return bf16, cast to float32" in out
    assert donated == [True, False]
    assert generate._step_jit_copying._cache_size() == 1  # the samples' decode steps did not donate the cache
    cpu, mps = losses_of(tmp_path / "cpu"), losses_of(tmp_path / "mps")
    worst = max(abs(a - b) / abs(b) for a, b in zip(mps, cpu))
    assert len(cpu) == len(mps) == 3 and 0 < worst <= BF16_REL, (worst, cpu, mps)
