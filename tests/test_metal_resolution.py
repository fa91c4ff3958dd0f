""".ci/metal_resolution.py offline: the recorded resolution of the metal extra against pyproject.toml."""

import importlib.util
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "metal_resolution.py"  # a script (`make metal-resolve`)
_spec = importlib.util.spec_from_file_location("metal_resolution", SCRIPT)
metal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(metal)

PYPROJECT = tomllib.loads((metal.ROOT / "pyproject.toml").read_text())
JAX_RANGE = Requirement("jax>=0.6,<0.11")


def pins_and_reqs(python: str = "3.11"):
    return metal.recorded(metal.RECORDED.read_text())[python], metal.requirements(PYPROJECT, python)


def test_the_recorded_resolution_fits_pyproject_and_pairs_jax_with_jax_mps(capsys):
    metal.main([])
    out = capsys.readouterr().out
    assert out.count("jax-mps==0.10.") == len(metal.PYTHONS), out


def test_the_metal_extra_applies_only_on_macos_arm64():
    names = {r.name for r in metal.requirements(PYPROJECT, "3.11")}
    assert "jax-mps" in names and "jax" in names
    assert "jax-mps" not in {r.name for r in metal.requirements(PYPROJECT, "3.10")}  # the extra's python_version


def test_a_requirement_the_recording_does_not_satisfy_asks_for_a_refresh():
    pins, reqs = pins_and_reqs()
    with pytest.raises(SystemExit, match=r"wants flax>=99.*make metal-refresh"):
        metal.check(pins, [*reqs, Requirement("flax>=99")], JAX_RANGE)
    with pytest.raises(SystemExit, match="wants no-such-package"):
        metal.check(pins, [*reqs, Requirement("no-such-package")], JAX_RANGE)


def test_jax_mps_missing_or_unpaired_fails():
    pins, reqs = pins_and_reqs()
    without = {k: v for k, v in pins.items() if k != "jax-mps"}
    with pytest.raises(SystemExit, match="jax-mps is missing"):
        metal.check(without, [r for r in reqs if r.name != "jax-mps"], JAX_RANGE)
    with pytest.raises(SystemExit, match="does not go with jax-mps"):
        metal.check(pins, reqs, Requirement("jax>=0.6,<0.10"))
