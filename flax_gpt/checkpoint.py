"""Training checkpoints with orbax: the TrainState plus a JSON record of how to continue.

A checkpoint directory is orbax's: OUT_DIR/checkpoints/<step>/{state,meta}. orbax writes each
step into <step>.orbax-checkpoint-tmp/ and renames it when complete, so a save killed midway
leaves only that tmp directory, which latest_step() and every restore ignore (the next save
of the same step replaces it).

A finished step directory can still be damaged later (a truncated copy, a full disk, bit rot).
Restores therefore try the steps newest first: an unreadable one is reported in one line on
stderr and skipped, never deleted; when no step can be read a UserError says what to do.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from flax_gpt.errors import UserError

T = TypeVar("T")
UNREADABLE_SUFFIX = ".unreadable"  # a damaged step set aside by a resumed run, so it can save that step again
DIVERGED_SUFFIX = ".diverged"  # a step saved after the loss went NaN/inf, set aside so --resume skips it


class Checkpointer:
    """Save / restore TrainState + metadata under one directory, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self._unreadable: set[int] = set()
        with _quiet_absl() if read_only else contextlib.nullcontext():  # orbax warns that a reader will not save
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
        """The metadata of a step (default: the newest readable one)."""
        used, meta, failed = self._first_readable(self._read_meta, step)
        self._report(failed, used)
        return meta

    def restore(self, abstract_state: Any, step: int | None = None,
                check_meta: Callable[[dict], None] | None = None) -> tuple[Any, dict]:
        """The state (shaped and sharded like abstract_state) and metadata of a step (default: the newest readable).

        check_meta(meta) runs before the state is read and may raise UserError (e.g. another model's run),
        which is raised as is. A writable Checkpointer that skipped damaged newer steps renames them to
        <step>.unreadable, so the resumed run can write those steps again; nothing is deleted.
        """
        def read(s: int) -> tuple[Any, dict]:
            meta = self._read_meta(s)
            if check_meta is not None:
                check_meta(meta)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            return self._manager.restore(s, args=args)["state"], meta

        used, result, failed = self._first_readable(read, step)
        moved = self.set_aside([s for s, _ in failed], UNREADABLE_SUFFIX) if failed and not self.read_only else {}
        self._report(failed, used, moved)
        return result

    def set_aside(self, steps: list[int], suffix: str) -> dict[int, Path]:
        """Rename step directories to <step><suffix> (never delete), so later saves and restores skip them."""
        self._manager.wait_until_finished()
        moved = {s: _free_name(self.directory / f"{s}{suffix}") for s in steps}
        if jax.process_index() == 0:
            for s, target in moved.items():
                (self.directory / str(s)).rename(target)
        self._manager.reload()
        return moved

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of a step (default: the newest readable), for fine-tuning or sampling."""
        def read(s: int) -> Any:
            abstract = {"params": abstract_params}  # with shardings: where the arrays go
            try:
                only_params = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
                    abstract), partial_restore=True)
                restored = self._manager.restore(s, args=ocp.args.Composite(state=only_params))
            except Exception:  # older orbax: no partial restore; read everything, keep params
                restored = self._manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            params = restored["state"]["params"]  # plain nested dicts, same leaf order as abstract_params
            return jax.tree.unflatten(jax.tree.structure(abstract_params), jax.tree.leaves(params))

        used, params, failed = self._first_readable(read, step)
        self._report(failed, used)
        return params

    def restore_raw(self, step: int | None = None) -> tuple[Any, dict]:
        """The whole state as saved (nested dicts and lists of numpy arrays) and the metadata of a step (default:
        the newest readable), for tools that read a run without knowing its optimizer (export)."""
        def read(s: int) -> tuple[Any, dict]:
            saved = ocp.PyTreeCheckpointer().metadata(self.directory / str(s) / "state")
            saved = getattr(getattr(saved, "item_metadata", saved), "tree", saved)  # the tree of array metadata
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)  # on any topology
            args = ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=as_numpy), meta=ocp.args.JsonRestore())
            restored = self._manager.restore(s, args=args)
            return restored["state"], restored["meta"]

        with _quiet_absl():  # orbax warns of metadata files that older runs did not write
            used, result, failed = self._first_readable(read, step)
        self._report(failed, used)
        return result

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _first_readable(self, read: Callable[[int], T], step: int | None) -> tuple[int, T, list[tuple[int, str]]]:
        """(step, read(step), [(newer step, why it failed)]) of the given step, else of the newest readable one."""
        _silence_failed_read_noise()  # before reading: a failing read reports itself while it fails, too
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is None and not steps:
            raise UserError(f"no checkpoint in {self.directory}")
        # steps found unreadable by an earlier call are not read (nor reported) again
        candidates = [step] if step is not None else [s for s in steps if s not in self._unreadable] or steps
        failed = []
        for s in candidates:
            try:
                return s, read(s), failed
            except UserError:
                raise
            except Exception as e:  # orbax / tensorstore / json raise many types (even bare Exception)
                failed.append((s, _reason(e)))
                self._unreadable.add(s)
            gc.collect()  # the abandoned reads report now (filtered), not in the middle of training
        tried = ", ".join(str(s) for s, _ in failed)
        raise UserError(f"no readable checkpoint in {self.directory}: step {tried} "
                        f"{'is' if len(failed) == 1 else 'are all'} damaged ({failed[0][1]}); nothing was deleted: "
                        "restore the directory from a backup, or start a new run with another --out-dir")

    def _report(self, failed: list[tuple[int, str]], used: int, moved: dict[int, Path] | None = None) -> None:
        """One warning line per damaged step that was skipped."""
        for s, why in failed:
            kept = f"kept as {moved[s].name}" if moved and s in moved else "left as it is"
            _warn_on_stderr(f"warning: checkpoint {self.directory / str(s)} is unreadable ({why}); using step {used} "
                       f"instead ({kept})")


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


@contextlib.contextmanager
def _quiet_absl():
    """absl (orbax's logger) at ERROR level for the duration."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _warn_on_stderr(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    """One short line about an orbax / tensorstore error (their messages run to pages)."""
    if str(e).startswith("Encountered error while reading array index") and e.__cause__ is not None:
        e = e.__cause__  # orbax's wrapper: the tensorstore error under it says what is wrong
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = re.sub(r' in OCDBT database at local file "[^"]*"|Error opening "\w+" driver: | \[tensorstore_spec.*', "", text)
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


def _silence_failed_read_noise() -> None:
    """Keep the leftovers of orbax's failed reads off stderr (installed once, before the first restore).

    When one array of a step cannot be read, orbax closes its event loop with the other reads still in flight;
    each then reports itself (a 'coroutine ignored' bare Exception with a page of TensorStore spec, 'RuntimeError:
    Event loop is closed' from tensorstore's threads, asyncio's 'Task exception was never retrieved', 'coroutine
    ... was never awaited' warnings), hundreds of lines in all, some while the read fails, some after the restore
    returned. Only those reports are dropped; the error that matters is the one raised to the caller, in one line.
    """
    global _noise_filtered
    if _noise_filtered:
        return
    _noise_filtered = True
    previous = sys.unraisablehook

    def hook(unraisable):
        text = str(unraisable.exc_value)
        if not (text.startswith("Encountered error while reading array index") or text == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    logging.getLogger("asyncio").addFilter(
        lambda record: not ("exception was never retrieved" in str(record.msg)
                            and ("orbax" in str(record.msg) or "tensorstore" in str(record.msg))))


_noise_filtered = False
