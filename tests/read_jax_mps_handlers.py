"""Read jax-mps's op handlers and custom-call targets from its source into tests/data/jax_mps_<version>_ops.json.

    git clone https://github.com/tillahoffmann/jax-mps && git -C jax-mps checkout <release commit>
    python tests/read_jax_mps_handlers.py jax-mps       # writes tests/data/jax_mps_<version>_ops.json

The plugin runs a module only if every op's name has a handler (GetOpHandlers, filled by the Register*Handlers
of src/pjrt_plugin/ops/*.cc), and a stablehlo.custom_call only if HandleCustomCall knows its target: the
names compared with callTargetName, and the mhlo.* unary ops of UnaryMlxOps.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "data"
OPS_DIR = "src/pjrt_plugin/ops"
CUSTOM_CALLS = f"{OPS_DIR}/control_flow.cc"


def op_handlers(src: Path) -> list[str]:
    """The op names registered by `handlers.insert({"name", Handler})` in the ops sources."""
    names = []
    for path in sorted((src / OPS_DIR).glob("*.cc")):
        names += re.findall(r'handlers\.insert\(\s*\{\s*"([^"]+)"', path.read_text())
    return sorted(set(names))


def _function_body(text: str, signature: str) -> str:
    """The text of the C++ function that starts at signature, up to its closing brace at column 0."""
    start = text.index(signature)
    return text[start:text.index("\n}\n", start)]


def custom_call_targets(src: Path) -> list[str]:
    """The call_target_name values HandleCustomCall dispatches: compared names and mhlo.<UnaryMlxOps key>."""
    text = (src / CUSTOM_CALLS).read_text()
    compared = re.findall(r'callTargetName == "([^"]+)"', _function_body(text, "bool HandleCustomCall("))
    unary = re.findall(r'\{"([a-z_]+)",\s*mlx::core::', _function_body(text, "UnaryMlxOps() {"))
    return sorted(set(compared) | {f"mhlo.{name}" for name in unary})


def read(src: Path) -> dict:
    """The record of the jax-mps checkout at src: version, commit, files read, ops and custom-call targets."""
    version = tomllib.loads((src / "pyproject.toml").read_text())["project"]["version"]
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return {"jax_mps_version": version, "source": "https://github.com/tillahoffmann/jax-mps", "commit": commit,
            "files": [f"{OPS_DIR}/*.cc (handlers.insert)", f"{CUSTOM_CALLS} (HandleCustomCall, UnaryMlxOps)"],
            "ops": op_handlers(src), "custom_call_targets": custom_call_targets(src)}


def main(argv: list[str]) -> int:
    record = read(Path(argv[1]))
    out = OUT_DIR / f"jax_mps_{record['jax_mps_version']}_ops.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{out}: {len(record['ops'])} ops, {len(record['custom_call_targets'])} custom-call targets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
