"""Apple GPUs: every program this project runs on `mps` uses only ops and custom calls jax-mps has handlers for.

jax-mps fails at run time on an op or custom-call target it has no handler for. The programs of
tests/jax_mps_programs.py are lowered for mps with jax-mps's Python lowerings stood in for
(tests/jax_mps_lowering.py, in a fresh process: the stand-in changes JAX) and taken as the plugin receives
them; their ops are checked against the handler list read from jax-mps's source
(tests/data/jax_mps_<version>_ops.json, written by tests/read_jax_mps_handlers.py).
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HANDLERS = json.loads((ROOT / "tests/data/jax_mps_0.10.11_ops.json").read_text())


@pytest.fixture(scope="module")
def lowered() -> dict:
    """tests/jax_mps_programs.py's report: each program's ops, custom-call targets and fused calls."""
    path = [str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/jax_mps_programs.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def problems(program: dict) -> list[str]:
    """What in a lowered program jax-mps would refuse or the stand-in cannot vouch for (empty: it runs)."""
    if "error" in program:
        return [program["error"]]
    found = []
    if ops := sorted(set(program["ops"]) - set(HANDLERS["ops"])):
        found.append(f"ops without a handler: {ops}")
    if targets := sorted(set(program["custom_calls"]) - set(HANDLERS["custom_call_targets"])):
        found.append(f"custom-call targets HandleCustomCall does not know: {targets}")
    if program["fused"]:
        found.append(f"calls jax-mps sends to its fused kernels, which the stand-in does not emit: {program['fused']}")
    return found


def test_every_program_uses_only_what_jax_mps_handles(lowered):
    refused = {name: found for name, program in lowered["programs"].items() if (found := problems(program))}
    assert not refused, f"jax-mps {HANDLERS['jax_mps_version']} would not run: {json.dumps(refused, indent=1)}"


def test_the_programs_cover_train_eval_hellaswag_generation_and_init(lowered):
    names = set(lowered["programs"])
    for name in ("init", "train fp32", "train bf16", "train bf16 remat", "train bf16 accum 2",
                 "train bf16 scan-layers", "eval", "hellaswag", "prefill top_k", "decode top_k"):
        assert name in names
    assert all(p.get("ops") for p in lowered["programs"].values())  # each one lowered to something


def test_gelu_layer_norm_and_attention_are_this_projects_own_ops(lowered):
    """No program reaches jax-mps's fused mps.gelu, mps.layer_norm or mps.sdpa (docs/apple.md)."""
    for program in lowered["programs"].values():
        assert not program["fused"]
        assert not [t for t in program["custom_calls"] if t.startswith(("mps.gelu", "mps.layer_norm", "mps.sdpa"))]


def test_the_check_refuses_each_kind_of_program_jax_mps_would_not_run(lowered):
    found = {name: problems(program) for name, program in lowered["controls"].items()}
    assert found["stablehlo.rng"] == ["ops without a handler: ['stablehlo.rng']"]
    assert found["unknown target"] == ["custom-call targets HandleCustomCall does not know: ['flax_gpt_no_such_target']"]
    assert found["jax.nn.gelu"] == ["calls jax-mps sends to its fused kernels, which the stand-in does not emit: "
                                    "['jax.nn.gelu -> mps.gelu']"]
    assert found["eigh"] and "not modelled" in found["eigh"][0]


def test_the_handler_list_is_of_the_jax_mps_the_metal_extra_takes():
    """Read from jax-mps 0.10.11 (commit 9cc6ce6): the extra's lowest version; a newer one must be read again."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [Requirement(r) for r in project["optional-dependencies"]["metal"]]
    assert req.name == "jax-mps" and f">={HANDLERS['jax_mps_version']}" in str(req.specifier)
    assert HANDLERS["commit"].startswith("9cc6ce6")
    assert (len(HANDLERS["ops"]), len(HANDLERS["custom_call_targets"])) == (83, 36)
