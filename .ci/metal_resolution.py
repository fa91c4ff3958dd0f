"""The `metal` extra resolved for macOS 14 on Apple silicon: it must hold jax-mps and a jax that jax-mps accepts.

    python .ci/metal_resolution.py            # `make metal-resolve` (in `make test`): offline
    python .ci/metal_resolution.py --refresh  # `make metal-refresh`: resolve again with uv, needs PyPI

The resolution is recorded in .ci/metal_resolution.txt, so `make test` needs no network: a new release
inside the ranges, or a registry outage, changes nothing until someone refreshes. Offline it checks the
recording against pyproject.toml as it is now: every requirement that applies on macOS 14 arm64 (the metal extra
included) is pinned there at a version the requirement admits, and jax pairs with jax-mps. uv judges the
extra's environment markers for the target platform (pip's --platform judges them for this machine, where the
darwin-only requirement resolves to nothing). Resolving is not running: see docs/apple.md.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RECORDED = Path(__file__).resolve().with_name("metal_resolution.txt")
PYTHONS = ("3.11", "3.12")  # jax-mps 0.10.x needs Python 3.11+
REFRESH = "make metal-refresh"  # uv pip compile against PyPI


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


def record(resolutions: dict[str, str]) -> str:
    """The text of metal_resolution.txt: a header, then `[python X.Y]` and its pinned lines for each Python."""
    head = (f"# The metal extra of pyproject.toml for macOS 14 arm64, resolved by `{REFRESH}` (uv, PyPI) on "
            f"{datetime.date.today().isoformat()};\n# `make metal-resolve` checks it offline "
            "(.ci/metal_resolution.py).\n")
    return head + "".join(f"[python {py}]\n{text.strip()}\n" for py, text in resolutions.items())


def recorded(text: str) -> dict[str, dict[str, Version]]:
    """{python: {canonical name: pinned version}} of a metal_resolution.txt."""
    out, pins = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[python ") and line.endswith("]"):
            pins = out.setdefault(line[len("[python "):-1], {})
        elif line and not line.startswith("#"):
            if pins is None or "==" not in line:
                raise SystemExit(f"metal-resolve: {RECORDED.name}: not a pin of a [python X.Y] section: {line!r}")
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = Version(version.split(";")[0].strip())
    return out


def requirements(pyproject: dict, python: str) -> list[Requirement]:
    """The dependencies and the metal extra of pyproject that apply on macOS 14 arm64 under `python`."""
    project = pyproject["project"]
    env = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "python_version": python, "python_full_version": f"{python}.0", "extra": "metal"}
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["metal"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def check(pins: dict[str, Version], reqs: list[Requirement], jax_range: Requirement) -> str:
    """The pins of jax-mps, jax and jaxlib; raises SystemExit unless every requirement is pinned at a version it
    admits, jax-mps is there and jax is in this package's range with jax-mps's major.minor (jax-mps's pairing)."""
    for req in reqs:
        name = canonicalize_name(req.name)
        if name not in pins or not req.specifier.contains(pins[name], prereleases=True):
            raise SystemExit(f"metal-resolve: pyproject.toml wants {req}, the recorded resolution has "
                             f"{pins.get(name, 'nothing')}: run {REFRESH} (needs PyPI)")
    if "jax-mps" not in pins:
        raise SystemExit("metal-resolve: jax-mps is missing from the resolution (check the metal extra's markers)")
    jax, mps = pins.get("jax", Version("0")), pins["jax-mps"]
    if jax not in jax_range.specifier or jax.release[:2] != mps.release[:2]:
        raise SystemExit(f"metal-resolve: jax {jax} does not go with jax-mps {mps} in this package's {jax_range}")
    return f"jax-mps=={mps} jax=={jax} jaxlib=={pins.get('jaxlib')}"


def main(argv: list[str]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    jax_range = next(Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "jax")
    if argv == ["--refresh"]:
        RECORDED.write_text(record({py: resolve(py) for py in PYTHONS}))
    elif argv:
        raise SystemExit(__doc__)
    resolutions = recorded(RECORDED.read_text())
    if sorted(resolutions) != sorted(PYTHONS):
        raise SystemExit(f"metal-resolve: {RECORDED.name} holds Pythons {sorted(resolutions)}, not {list(PYTHONS)}: "
                         f"run {REFRESH} (needs PyPI)")
    for python in PYTHONS:
        summary = check(resolutions[python], requirements(pyproject, python), jax_range)
        print(f"metal extra, macOS 14 arm64, Python {python} ({RECORDED.name}): {summary}")


if __name__ == "__main__":
    main(sys.argv[1:])
