"""One way to get a trained GPT from wherever it lives: `model = load_model("out")`.

    load_model   a training run's out dir or its checkpoints dir (orbax), an HF GPT-2 directory
                 (config.json + weights), or an HF hub id (gpt2, gpt2-medium, ...)
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from flax_gpt.config import GPTConfig
from flax_gpt.errors import UserError
from flax_gpt.model import GPT

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


class RunCheckpointError(UserError):
    """A training checkpoint directory that cannot be read."""


def load_model(init_from: str | Path, dtype: str | None = None, **numerics) -> GPT:
    """The GPT at init_from, computing in dtype (float32/fp32, bfloat16/bf16; None keeps the default).

    A directory holding numbered step directories (or a `checkpoints/` folder of them) is a
    training run: its latest step's parameters are loaded. Any other directory must be an HF
    GPT-2 directory; anything else is tried as an HF hub id (online or from the HF cache).
    numerics: GPTConfig fields that do not change the parameters (remat, matmul_output, ...).
    """
    if dtype is not None and dtype not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    numerics = {**numerics, **({"dtype": _DTYPES[dtype]} if dtype else {})}
    path = Path(init_from).expanduser()
    if path.is_dir():
        ckpt_dir = _checkpoint_dir(path)
        if ckpt_dir is not None:
            return load_checkpoint_model(ckpt_dir, **numerics)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is neither a training run (an out dir with checkpoints/<step>/, or that "
                            "checkpoints dir) nor an HF GPT-2 directory (config.json + model.safetensors)")
    return GPT.from_pretrained(str(init_from), **numerics)


def _checkpoint_dir(path: Path) -> Path | None:
    """The orbax directory of a flax_gpt run dir or checkpoints dir, if `path` is one."""
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return candidate
    return None


def load_checkpoint_model(ckpt_dir: Path, **numerics) -> GPT:
    """A GPT holding the latest parameters saved under ckpt_dir (an orbax checkpoints directory); numerics as in
    load_model, with dtype in GPTConfig's spelling."""
    import jax
    from flax import nnx

    from flax_gpt.checkpoint import Checkpointer

    try:
        with _quiet_absl():  # orbax warns that a read-only manager will not save
            ckpt = Checkpointer(ckpt_dir, read_only=True)
        meta = ckpt.restore_meta()
    except UserError:
        raise
    except Exception as e:  # orbax raises many types for unreadable or half-written directories
        raise RunCheckpointError(f"{ckpt_dir}: cannot read the training checkpoint ({_first_line(e)})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise RunCheckpointError(f"{ckpt_dir}: the checkpoint's meta has no model_config; not a flax_gpt training run")
    try:
        config = GPTConfig(**{**meta["model_config"], **numerics})
    except (TypeError, ValueError) as e:
        raise RunCheckpointError(f"{ckpt_dir}: bad model_config in the checkpoint's meta ({_first_line(e)})") from e
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(config)), nnx.Param)
    on = jax.sharding.SingleDeviceSharding(_default_device())  # orbax itself ignores jax.default_device
    try:
        params = ckpt.restore_params(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), abstract))
    except UserError:  # no step of the run is readable: the Checkpointer's message says so
        raise
    except Exception as e:
        raise RunCheckpointError(f"{ckpt_dir}: cannot restore the parameters of step {ckpt.latest_step()} "
                                 f"({_first_line(e)})") from e
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params)


def _default_device():
    """Where new arrays go: the device of an enclosing jax.default_device, else the first device."""
    import jax

    device = jax.config.jax_default_device
    return jax.devices(device)[0] if isinstance(device, str) else device or jax.devices()[0]


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
