"""Training checkpoints with orbax: the TrainState plus a JSON record of how to continue.

A checkpoint directory is orbax's: OUT_DIR/checkpoints/<step>/{state,meta}. orbax writes each
step into a temporary directory and renames it when complete, so a killed save never leaves
a step directory that looks finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from flax_gpt.errors import UserError


class Checkpointer:
    """Save / restore TrainState + metadata under one directory, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start writing step `step`; the device arrays are copied before this returns."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def restore_meta(self, step: int | None = None) -> dict:
        step = self._step_or_latest(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state (shaped and sharded like abstract_state) and metadata of a step (default latest)."""
        step = self._step_or_latest(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of a step, for fine-tuning or sampling from a training run."""
        step = self._step_or_latest(step)
        abstract = {"params": abstract_params}
        restore_args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract, strict=False))
        try:
            restored = self._manager.restore(step, args=restore_args)
        except Exception:  # older orbax: no partial restore; read everything, keep params
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        params = restored["state"]["params"]  # plain nested dicts, same leaf order as abstract_params
        return jax.tree.unflatten(jax.tree.structure(abstract_params), jax.tree.leaves(params))

    def wait(self) -> None:
        """Block until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _step_or_latest(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {self.directory}")
        return step


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)
