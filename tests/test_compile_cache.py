"""train.py keeps compiled programs under $FLAX_GPT_CACHE/xla; a user's JAX_COMPILATION_CACHE_DIR wins."""

import os
import subprocess
import sys

COMPILE_ONE = """
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even a tiny program
from flax_gpt.devices import enable_compile_cache
enable_compile_cache()
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
print(jax.config.jax_compilation_cache_dir)
"""


def run_compile(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} | env_extra
    out = subprocess.run([sys.executable, "-c", COMPILE_ONE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_compiled_programs_land_in_the_flax_gpt_cache(tmp_path):
    used = run_compile({"FLAX_GPT_CACHE": str(tmp_path)})
    assert used == str(tmp_path / "xla")
    assert any((tmp_path / "xla").iterdir()), "nothing was written to the compile cache"


def test_a_users_jax_cache_dir_wins(tmp_path):
    theirs = tmp_path / "theirs"
    used = run_compile({"FLAX_GPT_CACHE": str(tmp_path / "ours"), "JAX_COMPILATION_CACHE_DIR": str(theirs)})
    assert used == str(theirs)
    assert not (tmp_path / "ours" / "xla").exists()
