"""Where a run's records go besides metrics.jsonl: TensorBoard event files and Weights & Biases.

Both get the records MetricsLog writes, as they are written (process 0 only): every number in a record but its
step, under its metrics.jsonl name (loss, lr, grad_norm, tokens_per_s, mfu, val_loss, hellaswag_acc_norm, ...),
at the record's step. TensorBoard also gets each sample as text.

A resumed run goes on in the same places: TensorBoard's writer starts with a purge at the checkpoint's step
(TensorBoard drops the events of the old session from there on, as metrics.jsonl drops its records), and W&B
resumes the run whose id the checkpoint holds.
"""

from __future__ import annotations

import importlib
import os
import secrets
import string
from pathlib import Path

from flax_gpt.errors import UserError

EXTRAS = {"tensorboardX": ("tensorboard", "--tensorboard"), "wandb": ("wandb", "--wandb-project")}


def require(module: str):
    """The module, or a UserError naming the flag that needs it and the extra that installs it."""
    extra, flag = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{flag} needs the {module} package, which is not installed: "
                        f"pip install 'flax-gpt[{extra}]'") from None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record but its step: what TensorBoard and W&B chart."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def new_run_id() -> str:
    """A W&B run id: 8 random lowercase letters and digits, like wandb's own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class TensorBoardSink:
    """Scalars (and samples as text) into OUT_DIR/tensorboard with tensorboardX's writer: no TensorFlow."""

    def __init__(self, log_dir: Path, start_step: int):
        writer_class = require("tensorboardX").SummaryWriter
        # purge_step: TensorBoard discards the events at and after it that earlier sessions wrote
        self.writer = writer_class(logdir=str(log_dir), purge_step=start_step, flush_secs=30)
        self.where = f"TensorBoard: tensorboard --logdir {log_dir}"

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        if record.get("sample"):
            self.writer.add_text("sample", record["sample"], step)
        if "val_loss" in record or "hellaswag_acc" in record:  # an evaluation: let a watching TensorBoard see it
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """wandb.log of each record's numbers at its step, in the run `run_id` of `project` (created or resumed)."""

    def __init__(self, project: str, run_id: str, config: dict, out_dir: Path):
        wandb = require("wandb")
        where = None if os.environ.get("WANDB_DIR") else str(out_dir)  # WANDB_DIR wins, else the run's directory
        try:
            self.run = wandb.init(project=project, id=run_id, resume="allow", config=config, dir=where)
        except Exception as e:  # wandb's own errors: no login, no network, a bad project name, ...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--wandb-project {project}: W&B did not start ({reason}); run `wandb login`, "
                            "or set WANDB_MODE=offline to log locally and `wandb sync` later") from None
        self.where = f"W&B: project {project}, run {run_id} ({self.run.settings.mode})"

    def write(self, record: dict) -> None:
        numbers = scalars(record)
        if numbers:
            self.run.log(numbers, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_sinks(out_dir: Path, start_step: int, tensorboard: bool, wandb_project: str | None,
               wandb_run_id: str | None, config: dict) -> list:
    """The sinks the flags ask for (an empty list for none)."""
    sinks = []
    if tensorboard:
        sinks.append(TensorBoardSink(out_dir / "tensorboard", start_step))
    if wandb_project:
        try:
            sinks.append(WandbSink(wandb_project, wandb_run_id, config, out_dir))
        except BaseException:
            for sink in sinks:
                sink.close()
            raise
    return sinks
