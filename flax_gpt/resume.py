"""--resume's rules: the run's own flags from its checkpoint, its data and model unchanged, out_dir never overwritten."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from flax_gpt import devices
from flax_gpt.checkpoint import Checkpointer
from flax_gpt.config import GPTConfig
from flax_gpt.errors import UserError
from flax_gpt.run_config import NOT_RESTORED, RUN_FIELDS, TrainConfig


def restored_config(cfg: TrainConfig, given: set[str], saved: dict, where: Path, platform: str) -> TrainConfig:
    """cfg with the fields not given taken from the checkpoint's train_config; a given run-defining flag that
    contradicts the checkpoint is a one-line refusal naming both values."""
    restored = {}
    for name, saved_value in saved.items():
        if not hasattr(cfg, name) or name in NOT_RESTORED:
            continue
        if name not in given:
            restored[name] = saved_value
        elif name in RUN_FIELDS and _normal(name, getattr(cfg, name), platform) != _normal(name, saved_value, platform):
            was = saved_value if saved_value is not None else "not set: the preset's"
            raise UserError(f"--resume: --{name.replace('_', '-')} {getattr(cfg, name)} contradicts the run in {where} "
                            f"({was}); drop the flag to continue that run as it was"
                            + (extend_hint(saved) if name == "max_steps" else ", or start a new run with --out-dir"))
    cfg = dataclasses.replace(cfg, **restored)
    if cfg.extend_steps:  # the cosine keeps its length: the new steps run at min_lr, as nanoGPT past lr_decay_iters
        cfg = dataclasses.replace(cfg, max_steps=cfg.max_steps + cfg.extend_steps,
                                  decay_steps=saved.get("decay_steps") or saved.get("max_steps"))
    return cfg


def _normal(name: str, value, platform: str):
    """A flag's value in the form it is compared in: --data as an absolute path, --dtype resolved for training."""
    if name == "data" and value is not None:
        return str(Path(value).expanduser().resolve())
    if name == "dtype":
        return devices.compute_dtype(value, platform, training=True)
    return value


def extend_hint(saved: dict) -> str:
    final_lr = saved.get("lr", 0) * saved.get("min_lr_ratio", 0)
    return (f"; to train on past its end pass --extend-steps N (N more steps at its final learning rate "
            f"{final_lr:.3g}; the cosine keeps its length)")


def data_record(tokens) -> dict:
    """What the run trains on: the sources' sha256 (text through prepare) and each token file's length and the
    sha256 of its first and last MiB (reading all of a 20 GB corpus at every start would take minutes)."""
    sources = {s["path"]: s.get("sha256") for s in tokens.meta.get("sources", [])}
    files = {}
    for stream in (tokens.train, tokens.val):
        for name, part in zip(stream.names, stream.parts):
            head, tail = np.asarray(part[: 1 << 19]), np.asarray(part[-(1 << 19):])  # 1 MiB of uint16 each
            files[name] = f"{len(part)} tokens, {hashlib.sha256(head.tobytes() + tail.tobytes()).hexdigest()[:16]}"
    return {"path": str(tokens.path), "sources": sources, "files": files}


def check_same_data(saved: dict | None, now: dict, where: Path) -> None:
    """Refuse to resume on training data other than the checkpoint's, naming the first file that changed."""
    if not saved:
        return  # a checkpoint from before data records
    for kind, what in (("sources", "its sha256"), ("files", "its tokens")):
        old, new = saved.get(kind, {}), now.get(kind, {})
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                change = "is new" if name not in old else "is gone" if name not in new else f"has changed ({what})"
                raise UserError(f"--resume: the training data of the run in {where} changed: {name} {change}; "
                                "restore the data the run started with, or start a new run with --out-dir")



def saved_meta(ckpt_root: Path) -> dict:
    """The meta of the newest readable checkpoint under ckpt_root (read only: nothing is moved or written)."""
    ckpt = Checkpointer(ckpt_root, read_only=True)
    try:
        return ckpt.restore_meta()
    finally:
        ckpt.close()



def config_record(config: GPTConfig) -> dict:
    """The shape-defining fields of a model config (the numerics-only ones may change between runs)."""
    record = dataclasses.asdict(config)
    for numerics_only in ("dtype", "attention", "remat", "scan_layers", "matmul_output"):
        record.pop(numerics_only)
    return json.loads(json.dumps(record))


def config_diff(saved, config: GPTConfig) -> str:
    """'n_embd 32 in the checkpoint, 64 requested': only the fields that differ."""
    wanted = config_record(config)
    saved = saved if isinstance(saved, dict) else {}
    keys = [k for k in wanted if saved.get(k) != wanted[k]] + [k for k in saved if k not in wanted]
    return ", ".join(f"{k} {saved.get(k)} in the checkpoint, {wanted.get(k)} requested" for k in keys)


def check_out_dir(out_dir: Path, ckpt_root: Path, resume: bool) -> None:
    """Never overwrite a previous run's checkpoints unless asked to resume it."""
    has_ckpts = ckpt_root.is_dir() and any(p.name.isdigit() for p in ckpt_root.iterdir())
    if resume and not has_ckpts:
        raise UserError(f"--resume: no checkpoint in {ckpt_root}; drop --resume to start a new run")
    if not resume and has_ckpts:
        raise UserError(f"{out_dir} already holds a run's checkpoints; pass --resume to continue it "
                        "or --out-dir to start a new run elsewhere")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test.{os.getpid()}"  # one per process: processes of one run share out_dir
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out_dir}: {e.strerror}") from None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def check_same_model(meta: dict, config: GPTConfig, where: Path) -> None:
    """Refuse a checkpoint of another model shape, naming the fields that differ."""
    if meta.get("model_config") != config_record(config):
        raise UserError(f"--resume: {where} holds another model ({config_diff(meta.get('model_config'), config)}"
                        "); pass the model flags of the run being resumed, or a new --out-dir")


def check_not_finished(start_step: int, cfg: TrainConfig, where: Path) -> None:
    """Refuse to resume a run at its last step: nothing to redo (MetricsLog would drop the final val record)."""
    if start_step >= cfg.max_steps:
        raise UserError(f"--resume: {where} is at step {start_step}, the run is finished "
                        f"(--max-steps {cfg.max_steps}){extend_hint(dataclasses.asdict(cfg))}")
