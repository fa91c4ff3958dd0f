"""Resolve the `metal` extra for macOS 14 on Apple silicon and check it holds jax-mps and a jax that jax-mps accepts.

    python tests/check_metal_resolution.py        # `make metal-resolve`; needs PyPI

uv judges the extra's environment markers for the target platform (pip's --platform judges them for this
machine, where the darwin-only requirement resolves to nothing). Resolving is not running: see README.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.11", "3.12")  # jax-mps 0.10.x needs Python 3.11+


def resolve(python: str) -> str:
    """`uv pip compile` of pyproject.toml with the metal extra, for macOS 14 arm64 and `python`: pinned lines."""
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "MACOSX_DEPLOYMENT_TARGET": "14.0"}
    cmd = [sys.executable, "-m", "uv", "pip", "compile", str(ROOT / "pyproject.toml"), "--extra", "metal",
           "--python-platform", "aarch64-apple-darwin", "--python-version", python, "--no-header", "--no-annotate",
           "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"metal-resolve: uv could not resolve the metal extra for Python {python}:\n{proc.stderr}")
    return proc.stdout


def check(resolution: str, jax_range: Requirement) -> str:
    """The pins of jax-mps, jax and jaxlib in `resolution`; raises SystemExit unless jax-mps is there and jax is
    in this package's range with jax-mps's major.minor (the pairing jax-mps is built for)."""
    pins = dict(line.split("==", 1) for line in resolution.splitlines() if "==" in line)
    if "jax-mps" not in pins:
        raise SystemExit("metal-resolve: jax-mps is missing from the resolution (check the metal extra's markers)")
    jax, mps = Version(pins.get("jax", "0")), Version(pins["jax-mps"])
    if jax not in jax_range.specifier or jax.release[:2] != mps.release[:2]:
        raise SystemExit(f"metal-resolve: jax {jax} does not go with jax-mps {mps} in this package's {jax_range}")
    return f"jax-mps=={mps} jax=={jax} jaxlib=={pins.get('jaxlib')}"


def main() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    jax_range = next(Requirement(r) for r in dependencies if Requirement(r).name == "jax")
    for python in PYTHONS:
        print(f"metal extra, macOS 14 arm64, Python {python}: {check(resolve(python), jax_range)}")


if __name__ == "__main__":
    main()
