"""One way to get a trained GPT from wherever it lives: `model = load_model("out")`.

    load_model   a training run's out dir or its checkpoints dir (orbax), an HF GPT-2 directory
                 (config.json + weights), a build-nanogpt / nanoGPT checkpoint file (.pt), or an HF hub id
    load_run     the same GPT with what its source knows of its run (a training run's step, AdamW moments, ...)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from flax_gpt import devices, torch_ckpt
from flax_gpt.checkpoint import Checkpointer
from flax_gpt.config import GPTConfig
from flax_gpt.errors import UserError, first_line
from flax_gpt.model import GPT


class RunCheckpointError(UserError):
    """A training checkpoint directory that cannot be read."""


def load_model(init_from: str | Path, dtype: str | None = None, **numerics) -> GPT:
    """The GPT at init_from, computing in dtype (float32/fp32, bfloat16/bf16; None keeps the default).

    A directory holding numbered step directories (or a `checkpoints/` folder of them) is a
    training run: its latest step's parameters are loaded. Any other directory must be an HF
    GPT-2 directory; a file must be a build-nanogpt or nanoGPT checkpoint (torch.save, read without
    running code); anything else is tried as an HF hub id (online or from the HF cache).
    numerics: GPTConfig fields that do not change the parameters (remat, matmul_output, ...). The model comes in
    eval mode, as transformers' from_pretrained gives it: model.train() turns its dropout on.
    """
    model = _load_model(init_from, dtype, **numerics)
    model.eval()
    return model


def _load_model(init_from: str | Path, dtype: str | None = None, **numerics) -> GPT:
    """load_model's model, in the mode it was built in."""
    if dtype is not None and dtype not in devices.DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(devices.DTYPES)}")
    numerics = {**numerics, **({"dtype": devices.DTYPES[dtype]} if dtype else {})}
    path = Path(init_from).expanduser()
    if path.is_dir():
        ckpt_dir = _checkpoint_dir(path)
        if ckpt_dir is not None:
            return load_checkpoint_model(ckpt_dir, **numerics)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is neither a training run (an out dir with checkpoints/<step>/, or that "
                            "checkpoints dir) nor an HF GPT-2 directory (config.json + model.safetensors)")
    elif path.is_file():
        return torch_ckpt.load(path, **numerics)  # imports torch, an optional dependency, only now
    return GPT.from_pretrained(str(init_from), **numerics)


@dataclasses.dataclass
class TrainedModel:
    """A GPT and what its source knows of the run that trained it."""

    model: GPT
    step: int = 0  # optimizer steps taken
    train_config: dict | None = None  # a flax_gpt run's TrainConfig, as its checkpoint meta records it
    adam: tuple[GPT, GPT, int] | None = None  # AdamW moments (mu, nu: shaped like the model) and update count; None
    # for a run trained with Muon (its AdamW moments are not the model's)
    val_losses: dict[int, float] = dataclasses.field(default_factory=dict)  # by step, from the run's metrics.jsonl


def load_run(init_from: str | Path) -> TrainedModel:
    """The float32 GPT of load_model(init_from) with its run: a training run's latest readable step gives its
    step, settings, AdamW moments and val losses; any other source is a TrainedModel at step 0 with nothing else."""
    path = Path(init_from).expanduser()
    ckpt_dir = _checkpoint_dir(path) if path.is_dir() else None
    if ckpt_dir is None:
        return TrainedModel(load_model(init_from))
    ckpt = None
    try:
        ckpt = Checkpointer(ckpt_dir, read_only=True)
        tree, meta = ckpt.restore_raw()
    except UserError:
        raise
    except Exception as e:  # orbax raises many types for unreadable or half-written directories
        raise RunCheckpointError(f"{ckpt_dir}: cannot read the training checkpoint ({first_line(e)})") from e
    finally:
        if ckpt is not None:
            ckpt.close()
    config = _run_config(meta, ckpt_dir)
    fill = _filler(config, ckpt_dir)
    adam = (None if trained_with_muon(meta.get("train_config"))  # its AdamW moments cover part of the model
            else _adam_moments(tree.get("opt_state") if isinstance(tree, dict) else None))
    return TrainedModel(fill(tree["params"]), step=int(meta["step"]), train_config=meta.get("train_config"),
                        adam=(fill(adam["mu"]), fill(adam["nu"]), int(adam["count"])) if adam else None,
                        val_losses=_val_losses(ckpt_dir.parent / "metrics.jsonl"))


def _filler(config: GPTConfig, where: Path):
    """fill(raw) -> a GPT of config whose parameters are the leaves of raw (a restored tree in parameter order)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(config)), nnx.Param)
    wanted, treedef = jax.tree.flatten(abstract)

    def fill(raw) -> GPT:
        leaves = jax.tree.leaves(raw)
        if [tuple(x.shape) for x in leaves] != [tuple(a.shape) for a in wanted]:
            raise RunCheckpointError(f"{where}: the saved state does not have the shapes of its meta's model_config")
        values = [jnp.asarray(x, a.dtype) for x, a in zip(leaves, wanted)]
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, values))
        model.eval()  # as load_model gives it
        return model

    return fill


def trained_with_muon(train_config: dict | None) -> bool:
    """Whether a flax_gpt run's TrainConfig record (None for other sources) trained with --optimizer muon."""
    return (train_config or {}).get("optimizer") == "muon"


def _adam_moments(tree) -> dict | None:
    """The {'count', 'mu', 'nu'} of optax's AdamW state inside a restored opt_state tree, if there is one."""
    if isinstance(tree, dict):
        if {"count", "mu", "nu"} <= tree.keys():
            return tree
        tree = list(tree.values())
    for child in tree if isinstance(tree, (list, tuple)) else ():
        if (found := _adam_moments(child)) is not None:
            return found
    return None


def _val_losses(metrics: Path) -> dict[int, float]:
    """{step: val loss} of a run's metrics.jsonl (none if it is missing; half-written lines are skipped)."""
    losses = {}
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
            losses[int(record["step"])] = float(record["val_loss"])
        except (ValueError, KeyError, TypeError):
            continue
    return losses


def _checkpoint_dir(path: Path) -> Path | None:
    """The orbax directory of a flax_gpt run dir or checkpoints dir, if `path` is one."""
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return candidate
    return None


def load_checkpoint_model(ckpt_dir: Path, **numerics) -> GPT:
    """A GPT holding the latest parameters saved under ckpt_dir (an orbax checkpoints directory); numerics as in
    load_model, with dtype in GPTConfig's spelling."""
    try:
        ckpt = Checkpointer(ckpt_dir, read_only=True)
        meta = ckpt.restore_meta()
    except UserError:
        raise
    except Exception as e:  # orbax raises many types for unreadable or half-written directories
        raise RunCheckpointError(f"{ckpt_dir}: cannot read the training checkpoint ({first_line(e)})") from e
    config = _run_config(meta, ckpt_dir, **numerics)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(config)), nnx.Param)
    on = jax.sharding.SingleDeviceSharding(_default_device())  # orbax itself ignores jax.default_device
    try:
        params = ckpt.restore_params(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), abstract))
    except UserError:  # no step of the run is readable: the Checkpointer's message says so
        raise
    except Exception as e:
        raise RunCheckpointError(f"{ckpt_dir}: cannot restore the parameters of step {ckpt.latest_step()} "
                                 f"({first_line(e)})") from e
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params)


def _run_config(meta, ckpt_dir: Path, **numerics) -> GPTConfig:
    """The model config a training checkpoint's meta records, with numerics applied."""
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise RunCheckpointError(f"{ckpt_dir}: the checkpoint's meta has no model_config; not a flax_gpt training run")
    try:
        return GPTConfig(**{**meta["model_config"], **numerics})
    except (TypeError, ValueError) as e:
        raise RunCheckpointError(f"{ckpt_dir}: bad model_config in the checkpoint's meta ({first_line(e)})") from e


def _default_device():
    """Where new arrays go: the device of an enclosing jax.default_device, else the first device."""
    device = jax.config.jax_default_device
    return jax.devices(device)[0] if isinstance(device, str) else device or jax.devices()[0]

