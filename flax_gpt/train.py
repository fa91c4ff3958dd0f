"""The training run behind `python train.py`, in the order it happens:

    TrainConfig, RUN_PRESETS   the flags and the recipes that fill the ones not given
    restored_config            on --resume: the run's own flags from its checkpoint, refusing contradicting ones
    setup                      device, data, model and optimizer state, jitted steps, checkpoints, logs
    train                      the step loop: evaluations, one optimizer step, checkpoint, stop on Ctrl-C
    StepRecorder               each step's metrics -> metrics.jsonl (and its sinks), the progress bar, the log line
    eval_and_sample            val loss, HellaSwag, a sample -> metrics.jsonl, the log line, the plots
    run                        all of it, then the plots and a summary
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flax_gpt import devices
from flax_gpt.config import GPTConfig
from flax_gpt.config import preset as model_preset
from flax_gpt.errors import UserError


@dataclasses.dataclass
class TrainConfig:
    """Train a GPT-2 on a text corpus (defaults come from --preset; every field is a flag)."""

    preset: str = "small"  # run recipe: tiny | small | gpt2 | gpt2-medium | gpt2-large | gpt2-xl (see README)
    data: str | None = None  # token shards dir or .txt/.jsonl/.parquet file(s); default ./input.txt, else Shakespeare
    out_dir: str = "out"  # checkpoints/, metrics.jsonl and loss.png go here
    init_from: str | None = None  # scratch | an HF hub id (gpt2, ...) | an HF directory | a run; default: the preset's
    resume: bool = False  # continue the run in out_dir from its latest checkpoint, with that run's own flags
    extend_steps: int = 0  # with --resume: train this many steps past the run's --max-steps, at its final lr
    max_steps: int | None = None  # optimizer steps
    decay_steps: int | None = None  # the cosine reaches min_lr here and stays there (nanoGPT's lr_decay_iters); default max_steps
    batch_size: int | None = None  # sequences per micro batch (B)
    seq_len: int | None = None  # tokens per sequence (T), at most the model's block_size
    total_batch_size: int | None = None  # tokens per optimizer step; a multiple of B*T (gradient accumulation)
    lr: float | None = None  # max learning rate
    min_lr_ratio: float = 0.1  # min_lr = lr * min_lr_ratio, reached at decay_steps
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int | None = None  # steps between val-loss evaluations (and samples)
    eval_batches: int | None = None  # val batches per evaluation
    ckpt_interval: int | None = None  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3
    sample_tokens: int = 64  # tokens sampled at each evaluation (seed: --seed + step); 0 turns sampling off
    sample_prompt: str = "<|endoftext|>"  # the text each evaluation's sample continues
    hellaswag: str | None = None  # HellaSwag val JSON Lines (as published): acc and acc_norm during training
    hellaswag_interval: int | None = None  # steps between HellaSwag evaluations; default --eval-interval
    hellaswag_limit: int | None = None  # score only the file's first N examples (quick runs)
    tensorboard: bool = False  # also write TensorBoard event files to OUT_DIR/tensorboard (extra: tensorboard)
    wandb_project: str | None = None  # also log to this Weights & Biases project (extra: wandb; WANDB_MODE=offline works)
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "metal"] = "auto"
    sharding: Literal["auto", "none", "dp", "fsdp"] = "auto"  # auto: dp when more than one device is visible
    remat: bool = False  # recompute block activations in the backward pass: less memory, ~1/3 more compute
    scan_layers: bool = False  # rolled layer loop: compile time flat in depth, slower steps
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # compute dtype; auto: bf16 on GPUs and on CPUs with bf16 dot instructions
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto: cuDNN flash attention on CUDA in bf16, else XLA's
    n_layer: int | None = None  # model overrides of the preset's shape (scratch runs only)
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    progress: bool = True  # show a progress bar
    log_interval: int | None = None  # steps between 'step | loss | lr | norm | dt | tok/s' lines; default: every step without a bar
    debug: bool = False  # show tracebacks instead of one-line errors


# Flags that define a run: --resume takes them from the checkpoint and refuses a command line that contradicts them.
# The others (intervals, sampling, progress, memory and speed settings) may change between sessions.
# (The model's shape flags are checked against the checkpoint's model, which names the fields that differ.)
RUN_FIELDS = ("preset", "data", "init_from", "max_steps", "decay_steps", "batch_size", "seq_len", "total_batch_size",
              "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "seed", "dtype")
NOT_RESTORED = ("out_dir", "resume", "extend_steps", "device", "sharding", "debug")  # this session's own


@dataclasses.dataclass(frozen=True)
class RunPreset:
    model: str
    init_from: str
    batch_size: int
    seq_len: int
    total_batch_size: int
    max_steps: int
    lr: float
    warmup_steps: int
    eval_interval: int
    eval_batches: int
    ckpt_interval: int


def _fine_tune(model: str, batch_size: int) -> RunPreset:
    """nanoGPT's fine-tuning recipe (finetune_shakespeare.py) for the larger GPT-2s: their HF weights, 32 x 1024
    tokens per step, lr 3e-5; the micro batch is what fits one 80 GB GPU with its AdamW state."""
    return RunPreset(model, init_from=model, batch_size=batch_size, seq_len=1024, total_batch_size=32 * 1024,
                     max_steps=200, lr=3e-5, warmup_steps=10, eval_interval=25, eval_batches=20, ckpt_interval=100)


RUN_PRESETS = {
    "tiny": RunPreset("tiny", "scratch", batch_size=8, seq_len=64, total_batch_size=512, max_steps=40, lr=3e-3,
                      warmup_steps=4, eval_interval=20, eval_batches=2, ckpt_interval=20),
    "small": RunPreset("small", "scratch", batch_size=8, seq_len=128, total_batch_size=1024, max_steps=350, lr=2e-3,
                       warmup_steps=20, eval_interval=50, eval_batches=8, ckpt_interval=100),
    "gpt2": RunPreset("gpt2", "scratch", batch_size=64, seq_len=1024, total_batch_size=524288, max_steps=19073,
                      lr=6e-4, warmup_steps=715, eval_interval=250, eval_batches=20, ckpt_interval=5000),
    "gpt2-medium": _fine_tune("gpt2-medium", batch_size=16),
    "gpt2-large": _fine_tune("gpt2-large", batch_size=8),
    "gpt2-xl": _fine_tune("gpt2-xl", batch_size=4),
}


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill unset fields from the run preset and check every size."""
    if cfg.preset not in RUN_PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose one of: {', '.join(RUN_PRESETS)}")
    base = RUN_PRESETS[cfg.preset]
    filled = {f: getattr(base, f) for f in ("init_from", "batch_size", "seq_len", "max_steps", "lr", "warmup_steps",
                                             "eval_interval", "eval_batches", "ckpt_interval")
              if getattr(cfg, f) is None}
    cfg = dataclasses.replace(cfg, **filled)
    cfg = dataclasses.replace(cfg, decay_steps=cfg.decay_steps or cfg.max_steps)
    for name in ("max_steps", "decay_steps", "batch_size", "seq_len", "total_batch_size", "eval_interval",
                 "eval_batches", "ckpt_interval", "keep_checkpoints", "log_interval", "hellaswag_interval",
                 "hellaswag_limit"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.warmup_steps < 0 or cfg.sample_tokens < 0 or cfg.extend_steps < 0:
        raise UserError("--lr must be positive and --warmup-steps, --sample-tokens, --extend-steps non-negative")
    if cfg.extend_steps and not cfg.resume:
        raise UserError("--extend-steps continues a run: use it with --resume")
    if cfg.hellaswag is None and (cfg.hellaswag_interval or cfg.hellaswag_limit):
        raise UserError("--hellaswag-interval and --hellaswag-limit set how --hellaswag FILE is scored: pass the file")
    if not cfg.sample_prompt:
        raise UserError("--sample-prompt is empty; give some text, or the default <|endoftext|>")
    from flax_gpt.sinks import require

    for module, wanted in (("tensorboardX", cfg.tensorboard), ("wandb", cfg.wandb_project)):
        if wanted:
            require(module)  # a missing package fails before JAX starts
    grad_accum_steps(cfg)  # raises early if the tokens per step are not a whole number of micro batches
    return cfg


def grad_accum_steps(cfg: TrainConfig, process_count: int = 1) -> int:
    """Micro steps per optimizer step: tokens per step / (B * T * processes).

    Tokens per step are --total-batch-size, else the preset's (gpt2: 524,288): the same whatever
    --batch-size, --seq-len and the process count are, as in build-nanogpt.
    """
    total = cfg.total_batch_size or RUN_PRESETS[cfg.preset].total_batch_size
    per_micro = cfg.batch_size * cfg.seq_len * process_count
    if total % per_micro:
        source = f"--total-batch-size {total}" if cfg.total_batch_size else f"the {cfg.preset} preset's {total:,} tokens per step"
        raise UserError(f"{source} is not a multiple of batch_size*seq_len*processes = "
                        f"{cfg.batch_size}*{cfg.seq_len}*{process_count} = {per_micro:,}; choose sizes that divide it"
                        + ("" if cfg.total_batch_size else " or pass --total-batch-size"))
    return total // per_micro


def given_fields(argv: list[str]) -> set[str]:
    """The TrainConfig fields set on a command line (`--lr 1e-3`, `--lr=1e-3`, `--no-progress`)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            given.add(name if name in names else name.removeprefix("no_"))
    return given & names


def changed_fields(cfg: TrainConfig) -> set[str]:
    """The fields of cfg that differ from TrainConfig's defaults: the given ones when no command line is known."""
    default = TrainConfig()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


# ----------------------------------------------------------------------------- --resume


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
                            + (_extend_hint(saved) if name == "max_steps" else ", or start a new run with --out-dir"))
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


def _extend_hint(saved: dict) -> str:
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


# ----------------------------------------------------------------------------- model init


def _model_config(cfg: TrainConfig, dtype: str, **numerics) -> GPTConfig:
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k)}
    try:
        return model_preset(RUN_PRESETS[cfg.preset].model, dtype=dtype, **overrides, **numerics)
    except ValueError as e:
        raise UserError(str(e)) from None


def init_model(cfg: TrainConfig, dtype: str, **numerics):
    """The starting model: fresh GPT-2 init, HF weights, or the params of a training checkpoint.

    numerics: GPTConfig fields that leave the parameters alone (remat, scan_layers, matmul_output).
    """
    from flax_gpt.load import load_model
    from flax_gpt.model import GPT

    if cfg.init_from in (None, "scratch"):
        return GPT(_model_config(cfg, dtype, **numerics), seed=cfg.seed)
    return load_model(cfg.init_from, dtype, **numerics)


def init_train_state(cfg: TrainConfig, dtype: str, numerics: dict, tx, mesh=None, strategy: str = "none"):
    """(model config, graphdef, TrainState, its shardings or None) of the run's starting model.

    Without a mesh the state is built on the default device. With one it is created already sharded: a fresh
    init runs under jit with the state's shardings as its outputs, and loaded weights wait on the host until each
    goes to its own shards, so no device ever holds the whole state.
    """
    import functools

    import jax

    from flax_gpt.model import GPT
    from flax_gpt.sharding import state_shardings
    from flax_gpt.train_step import init_state, shard_state, sharded_init

    if mesh is None:
        model = init_model(cfg, dtype, **numerics)
        return (model.config, *init_state(model, tx), None)
    shardings_of = functools.partial(state_shardings, mesh=mesh, strategy=strategy)
    if cfg.init_from in (None, "scratch"):
        config = _model_config(cfg, dtype, **numerics)
        graphdef, init, shardings = sharded_init(lambda: GPT(config, seed=cfg.seed), tx, shardings_of)
        return config, graphdef, init(), shardings
    with jax.default_device(devices.host_device()):
        model = init_model(cfg, dtype, **numerics)
    return (model.config, *shard_state(model, tx, shardings_of))


# ----------------------------------------------------------------------------- setup


class Diverged(Exception):
    """The loss or the gradient norm became NaN or infinite at optimizer step `step`.

    first_bad: the first checkpoint step whose parameters are not to be trusted (the loss of step s
    is computed from checkpoint s's parameters; a NaN gradient at step s spoils checkpoint s + 1).
    """

    def __init__(self, step: int, first_bad: int, message: str):
        super().__init__(message)
        self.step, self.first_bad = step, first_bad


@dataclasses.dataclass
class Run:
    """Everything the step loop needs, made by setup()."""

    cfg: TrainConfig
    platform: str
    dtype: str
    out_dir: Path
    config: GPTConfig  # the model's
    graphdef: Any
    state: Any  # TrainState: step, params, opt_state
    train_step: Any  # jitted (state, x (A, B, T), y (A, B, T)) -> (state, metrics)
    eval_step: Any  # jitted (params, x (B, T), y (B, T)) -> loss
    loader: Any  # data.DataLoader
    val_batches: list
    batch_sharding: Any  # None on one device
    eval_sharding: Any
    ckpt: Any  # checkpoint.Checkpointer
    metrics_log: Any  # metrics.MetricsLog
    meta: dict  # what every checkpoint's meta holds besides the loader state and the step
    accum: int
    tokens_per_step: int
    n_params: int
    is_main: bool
    start_step: int = 0
    hellaswag: Any = None  # HellaSwagEval of --hellaswag, or None
    plotted_at: float = dataclasses.field(default_factory=time.monotonic)  # when the plots were last drawn

    def to_device(self, local: np.ndarray, sharding):
        """This process's numpy rows as (its part of) a device array."""
        import jax.numpy as jnp

        from flax_gpt.sharding import global_batch

        return jnp.asarray(local) if sharding is None else global_batch(local, sharding)

    def log(self, line: str) -> None:
        if self.is_main:
            print(line)


def setup(cfg: TrainConfig, given: set[str]) -> tuple[Run, float | None]:
    """The run as configured (or as its checkpoint says, on --resume): (Run, peak FLOP/s for MFU or None)."""
    if not cfg.resume:
        resolve(cfg)  # bad flags fail before JAX starts
    platform = devices.select_device(cfg.device)
    out_dir = Path(cfg.out_dir).expanduser()
    ckpt_root = out_dir / "checkpoints"
    _check_out_dir(out_dir, ckpt_root, cfg.resume)
    from flax_gpt import data as data_lib
    from flax_gpt import sharding as shard
    from flax_gpt.checkpoint import Checkpointer

    saved = _saved_meta(ckpt_root) if cfg.resume else {}
    if cfg.resume:
        cfg = restored_config(cfg, given, saved.get("train_config", {}), ckpt_root, platform)
    cfg = resolve(cfg)
    examples = _hellaswag_examples(cfg)
    devices.enable_compile_cache()
    caps = devices.capabilities(platform)
    dtype = devices.compute_dtype(cfg.dtype, platform, training=True)

    import jax

    from flax_gpt.metrics import MetricsLog, params_without_wpe, peak_flops
    from flax_gpt.optim import OptimConfig, lr_schedule, make_optimizer
    from flax_gpt.sinks import new_run_id, open_sinks
    from flax_gpt.train_step import make_eval_step, make_train_step

    source = data_lib.resolve_source(cfg.data, Path.cwd())
    tokens = data_lib.load(str(source), Path.cwd())
    data = data_record(tokens)
    if cfg.resume:
        check_same_data(saved.get("data"), data, ckpt_root)
    n_proc, proc = jax.process_count(), jax.process_index()
    strategy = shard.resolve_strategy(cfg.sharding)
    if strategy == "none" and n_proc > 1:
        raise UserError(f"--sharding none with {n_proc} processes would train {n_proc} unsynchronised copies into one "
                        "--out-dir; use --sharding dp or fsdp (auto picks dp)")
    if strategy != "none":
        shard.check_batch_divides(cfg.batch_size, n_proc, jax.local_device_count())
    accum = grad_accum_steps(cfg, n_proc)
    loader = data_lib.DataLoader(tokens.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                 process_index=proc, process_count=n_proc)
    val_batches = data_lib.eval_batches(tokens.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                                        process_index=proc, process_count=n_proc)

    optim_cfg = OptimConfig(lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, warmup_steps=max(cfg.warmup_steps, 1),
                            max_steps=cfg.decay_steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    tx = make_optimizer(optim_cfg)
    mesh = shard.make_mesh() if strategy != "none" else None
    numerics = {"remat": cfg.remat, "scan_layers": cfg.scan_layers, "matmul_output": caps.matmul_output,
                "attention": devices.attention_implementation(cfg.attention, platform, dtype)}
    config, graphdef, state, state_sh = init_train_state(cfg, dtype, numerics, tx, mesh, strategy)
    _check_model_fits_data(cfg, config)
    batch_sh = eval_sh = None
    if mesh is not None:
        batch_sh = shard.batch_sharding(mesh)
        eval_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shard.AXIS, None))
    _check_sample_prompt(cfg, config)
    hellaswag = hellaswag_eval(cfg, examples, config, graphdef, state_sh.params if state_sh else None, eval_sh,
                               proc, n_proc) if examples else None

    ckpt = Checkpointer(ckpt_root, keep=cfg.keep_checkpoints)
    start_step = 0
    if cfg.resume:
        from flax_gpt.checkpoint import abstract_like

        def same_model(meta: dict) -> None:  # checked before the state is read: shapes differ otherwise
            if meta.get("model_config") != _config_record(config):
                raise UserError(f"--resume: {ckpt_root} holds another model ({_config_diff(meta.get('model_config'), config)}"
                                "); pass the model flags of the run being resumed, or a new --out-dir")

        state, restored = ckpt.restore(abstract_like(state), check_meta=same_model)
        loader.load_state_dict(restored["loader"])
        start_step = int(state.step)
        if start_step >= cfg.max_steps:  # nothing to redo: MetricsLog would drop the final val record
            raise UserError(f"--resume: {ckpt_root} is at step {start_step}, the run is finished "
                            f"(--max-steps {cfg.max_steps}){_extend_hint(dataclasses.asdict(cfg))}")
    is_main = proc == 0
    n_params = params_without_wpe(state.params, config)
    saved_cfg = dataclasses.replace(cfg, data=str(source), extend_steps=0,
                                    dtype={"float32": "fp32", "bfloat16": "bf16"}[dtype],
                                    hellaswag=cfg.hellaswag and str(Path(cfg.hellaswag).expanduser().resolve()))
    meta = {"model_config": _config_record(config), "train_config": dataclasses.asdict(saved_cfg), "data": data,
            "seed": cfg.seed}
    wandb_run_id = saved.get("wandb_run_id") or (new_run_id() if cfg.wandb_project else None)
    if wandb_run_id:  # kept in every later checkpoint: a resumed run logs on into the same W&B run
        meta["wandb_run_id"] = wandb_run_id
    sinks = open_sinks(out_dir, start_step, cfg.tensorboard, cfg.wandb_project, wandb_run_id,
                       meta["train_config"]) if is_main else []
    r = Run(cfg=cfg, platform=platform, dtype=dtype, out_dir=out_dir, config=config, graphdef=graphdef, state=state,
            train_step=make_train_step(graphdef, tx, lr_schedule(optim_cfg), state_sh, batch_sh, donate=caps.donation),
            eval_step=make_eval_step(graphdef, state_sh.params if state_sh else None, eval_sh),
            loader=loader, val_batches=val_batches, batch_sharding=batch_sh, eval_sharding=eval_sh, ckpt=ckpt,
            metrics_log=MetricsLog(out_dir / "metrics.jsonl", resume_from_step=start_step if cfg.resume else None,
                                   enabled=is_main, sinks=sinks),
            meta=meta, accum=accum, tokens_per_step=accum * cfg.batch_size * cfg.seq_len * n_proc, n_params=n_params,
            is_main=is_main, start_step=start_step, hellaswag=hellaswag)
    step_devices = jax.local_devices() if strategy != "none" else jax.local_devices()[:1]  # in each process
    peak, peak_source = peak_flops(dtype, step_devices, n_proc)
    r.log(f"model: {n_params / 1e6:.1f}M params, {config.n_layer} layers, {config.n_embd} wide, dtype {dtype}, "
          f"{config.attention} attention on {platform}; data: {len(tokens.train):,} train / {len(tokens.val):,} val "
          f"tokens; batch {cfg.batch_size}x{cfg.seq_len} x {accum} accum x {n_proc} processes = "
          f"{r.tokens_per_step:,} tokens/step; {jax.device_count()} devices, sharding {strategy}")
    if cfg.resume:
        r.log(f"resuming {ckpt_root} at step {start_step} of {cfg.max_steps}" +
              (f" (extended by {cfg.extend_steps}: lr {cfg.lr * cfg.min_lr_ratio:.3g} after step {cfg.decay_steps})"
               if cfg.extend_steps else ""))
    r.log(f"mfu against {peak / 1e12:.3g} TFLOP/s: {peak_source}" if peak else f"note: mfu is not reported: {peak_source}")
    if hellaswag:
        rows, length = hellaswag.batches[0][0].shape
        r.log(f"hellaswag: {len(hellaswag.labels)} examples of {cfg.hellaswag} every "
              f"{cfg.hellaswag_interval or cfg.eval_interval} steps, {len(hellaswag.batches)} batches of "
              f"{rows * n_proc}x{length} tokens")
    for sink in sinks:
        r.log(f"logging to {sink.where}")
    if caps.fallbacks():
        r.log(f"{platform} falls back to: {', '.join(caps.fallbacks())}")
    dtype_note = devices.auto_dtype_note(cfg.dtype, platform)
    if dtype_note:
        r.log(dtype_note)
    return r, peak


def _saved_meta(ckpt_root: Path) -> dict:
    """The meta of the newest readable checkpoint under ckpt_root (read only: nothing is moved or written)."""
    from flax_gpt.checkpoint import Checkpointer
    ckpt = Checkpointer(ckpt_root, read_only=True)
    try:
        return ckpt.restore_meta()
    finally:
        ckpt.close()


def _hellaswag_examples(cfg: TrainConfig) -> list[dict] | None:
    """The first --hellaswag-limit examples of --hellaswag (all without a limit), each checked; None without it."""
    if cfg.hellaswag is None:
        return None
    from flax_gpt.evaluate import read_hellaswag

    return read_hellaswag(cfg.hellaswag)[: cfg.hellaswag_limit]


@dataclasses.dataclass
class HellaSwagEval:
    """--hellaswag's examples in fixed-shape batches (this process's rows) and the jitted step that scores them."""

    step: Any  # jitted (params, tokens (R, L), mask (R, L)) -> (sums (R,), counts (R,)), R over all processes
    batches: list  # [(tokens, mask)] (E*4, L) int32 each
    labels: np.ndarray  # (n,) the right ending of every example


def hellaswag_eval(cfg: TrainConfig, examples: list[dict], config: GPTConfig, graphdef, params_sharding,
                   eval_sharding, process_index: int, process_count: int) -> HellaSwagEval:
    """The examples rendered as evaluate.py renders them, batched over processes and devices like the val loss."""
    import jax

    from flax_gpt import evaluate as ev
    from flax_gpt.tokenizer import get_encoding

    enc = get_encoding()
    rendered = [ev.render_example(e, config.block_size, enc, f"--hellaswag {cfg.hellaswag}: example {i + 1}")
                for i, e in enumerate(examples)]
    n_devices = jax.local_device_count() if eval_sharding is not None else 1
    per_process = hellaswag_examples_per_batch(cfg.batch_size, n_devices)
    batches = ev.hellaswag_batches(rendered, per_process, config.block_size, process_index, process_count)
    step = ev.make_hellaswag_step(graphdef, ev.ending_length(rendered), params_sharding, eval_sharding)
    return HellaSwagEval(step, batches, np.array([e["label"] for e in examples]))


def hellaswag_examples_per_batch(batch_size: int, n_devices: int) -> int:
    """Examples per process in a HellaSwag batch: about batch_size rows (4 per example), and rows that split
    evenly over the process's devices."""
    from flax_gpt.evaluate import N_ENDINGS

    unit = n_devices // math.gcd(n_devices, N_ENDINGS)
    return -(-max(1, batch_size // N_ENDINGS) // unit) * unit


def _check_sample_prompt(cfg: TrainConfig, config: GPTConfig) -> None:
    """The prompt must leave room in the context for at least one sampled token."""
    if cfg.sample_tokens == 0:
        return
    from flax_gpt.tokenizer import get_encoding

    n = len(get_encoding().encode(cfg.sample_prompt, allowed_special="all"))
    if n >= config.block_size:
        raise UserError(f"--sample-prompt is {n} tokens, the model's context is {config.block_size}: "
                        "shorten it (or pass --sample-tokens 0)")


def _check_model_fits_data(cfg: TrainConfig, config: GPTConfig) -> None:
    """The data is GPT-2 tokens and T must fit the model: refuse a model that cannot read them."""
    from flax_gpt.tokenizer import N_VOCAB

    if config.vocab_size < N_VOCAB:
        raise UserError(f"--init-from {cfg.init_from}: the model's vocabulary has {config.vocab_size} tokens, the data "
                        f"is GPT-2 tokens (ids up to {N_VOCAB - 1}); start from a model with GPT-2's vocabulary")
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's block_size {config.block_size}")


# ----------------------------------------------------------------------------- the step loop


class StepRecorder:
    """Each step's device metrics -> a metrics.jsonl record, the progress bar, a log line; NaN/inf -> Diverged."""

    def __init__(self, r: Run, bar, flops_per_step: float, peak: float | None, log_every: int | None):
        self.r, self.bar, self.flops_per_step, self.peak, self.log_every = r, bar, flops_per_step, peak, log_every
        self.last_time = time.perf_counter()
        self.first_step_s = self.first_loss = self.last_loss = None

    def __call__(self, step: int, device_metrics) -> None:
        import jax

        from flax_gpt.metrics import mfu

        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        dt, self.last_time = now - self.last_time, now
        self.first_step_s = dt if self.first_step_s is None else self.first_step_s
        if not math.isfinite(m["loss"]):
            raise Diverged(step, step, f"loss is {m['loss']} at step {step}")
        if not math.isfinite(m["grad_norm"]):  # the update of this step made the parameters NaN
            raise Diverged(step, step + 1, f"gradient norm is {m['grad_norm']} at step {step}")
        rec = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], "ms_per_step": dt * 1e3,
               "tokens_per_s": self.r.tokens_per_step / dt, "mfu": mfu(self.flops_per_step / dt, self.peak)}
        self.r.metrics_log.write(rec)
        self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = m["loss"]
        shown = {"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] is not None else {}
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", **shown, refresh=False)
        self.bar.update(1)
        if self.log_every and step % self.log_every == 0 and self.r.is_main:  # build-nanogpt's line
            self.bar.write(f"step {step:5d} | loss {m['loss']:.6f} | lr {m['lr']:.4e} | norm {m['grad_norm']:.4f} | "
                           f"dt {dt * 1e3:.2f}ms | tok/s {rec['tokens_per_s']:,.0f}", file=sys.stdout)


def evaluate(r: Run) -> float:
    """Mean val loss of the current parameters over the fixed val batches (all processes)."""
    import jax

    losses = [r.eval_step(r.state.params, r.to_device(x, r.eval_sharding), r.to_device(y, r.eval_sharding))
              for x, y in r.val_batches]
    return float(np.mean(jax.device_get(losses)))


def hellaswag(r: Run) -> dict:
    """HellaSwag acc, acc_norm, n and correct counts of the current parameters (all processes)."""
    from flax_gpt.evaluate import score_batches

    h = r.hellaswag
    return score_batches(h.step, r.state.params, h.batches, h.labels, lambda rows: r.to_device(rows, r.eval_sharding))


def sample(r: Run, step: int) -> str:
    """--sample-tokens tokens after --sample-prompt (top-k 50, seed --seed + step), decoded with the prompt unless
    it is <|endoftext|>; '' when sampling is off."""
    if r.cfg.sample_tokens == 0:
        return ""
    from flax import nnx

    from flax_gpt.generate import generate
    from flax_gpt.tokenizer import get_encoding

    enc = get_encoding()
    prompt = enc.encode(r.cfg.sample_prompt, allowed_special="all")
    n_new = min(r.cfg.sample_tokens, r.config.block_size - len(prompt))
    ids = generate(nnx.merge(r.graphdef, r.state.params), [prompt], n_new, temperature=1.0, top_k=50,
                   seed=r.cfg.seed + step)  # (1, len(prompt) + n_new)
    text = enc.decode([int(t) for t in ids[0, len(prompt):]])
    return text if prompt == [enc.eot_token] else r.cfg.sample_prompt + text


def evaluations_due(cfg: TrainConfig, step: int, final: bool) -> tuple[bool, bool]:
    """(val loss and sample, HellaSwag) at the parameters after `step` steps: at their intervals and at the end."""
    val = final or step % cfg.eval_interval == 0
    interval = cfg.hellaswag_interval or cfg.eval_interval
    return val, cfg.hellaswag is not None and (final or step % interval == 0)


# Plots are redrawn at an evaluation when the last drawing is this old (a drawing takes 0.5-2 s: not every few
# steps of a test run, but every evaluation of a real one)
PLOT_EVERY_S = 30.0


def eval_and_sample(r: Run, step: int, bar, final: bool = False) -> dict:
    """The evaluations due after `step` steps (val loss + sample, HellaSwag) into metrics.jsonl, the sinks and the
    log, and the plots redrawn (at most every PLOT_EVERY_S); returns the record."""
    from flax_gpt.metrics import peak_device_memory_gib

    want_val, want_hellaswag = evaluations_due(r.cfg, step, final)
    rec, shown = {"step": step}, [f"step {step:5d}"]
    if want_val:
        rec["val_loss"] = evaluate(r)
        shown.append(f"val loss {rec['val_loss']:.4f}")
    if want_hellaswag:
        t0 = time.perf_counter()
        h = hellaswag(r)
        rec |= {"hellaswag_acc": h["acc"], "hellaswag_acc_norm": h["acc_norm"]}
        shown.append(f"hellaswag acc {h['acc']:.4f} acc_norm {h['acc_norm']:.4f} ({h['correct_norm']}/{h['n']}, "
                     f"{time.perf_counter() - t0:.1f} s)")
    peak_memory = peak_device_memory_gib()
    if peak_memory is not None:
        rec["peak_device_memory_GiB"] = peak_memory
        shown.append(f"peak device memory {peak_memory:.1f} GiB")
    if want_val:
        rec["sample"] = sample(r, step)
        shown.append(f"sample: {rec['sample'][:200]!r}")
    r.metrics_log.write(rec)
    if r.is_main:
        bar.write(" | ".join(shown), file=sys.stdout)
        if not final and time.monotonic() - r.plotted_at >= PLOT_EVERY_S:  # the end of the run draws them anyway
            draw_plots(r)
    return rec


def draw_plots(r: Run) -> None:
    """loss.png (train and val loss) and metrics.png (every panel) of the run so far, from metrics.jsonl."""
    from flax_gpt.plot import panels_of, plot_losses, plot_runs

    runs = {r.out_dir.name: r.metrics_log.read()}
    title = f"flax-gpt {r.cfg.preset}: {r.n_params / 1e6:.1f}M params"
    plot_losses(runs[r.out_dir.name], r.out_dir / "loss.png", title=title)
    if panels_of(runs):  # none before the first record
        plot_runs(runs, r.out_dir / "metrics.png", title=title)
    r.plotted_at = time.monotonic()


def train(r: Run, record: StepRecorder, bar, interrupted) -> tuple[int, list]:
    """Steps from r.start_step to --max-steps (or a Ctrl-C): eval + sample every --eval-interval, HellaSwag every
    --hellaswag-interval, checkpoints every --ckpt-interval; all of them at the end. Returns (steps done,
    [(step, val loss)])."""
    cfg, val_losses = r.cfg, []
    pending = None  # (step, device metrics) of the step in flight: read after the next one is queued

    def flush():
        nonlocal pending
        if pending is not None:
            record(*pending)
            pending = None

    def evaluate_at(step: int, final: bool = False):  # the parameters after `step` steps
        flush()
        rec = eval_and_sample(r, step, bar, final)
        record.last_time = time.perf_counter()  # the next step's dt is its own: evaluations are not in it
        if "val_loss" in rec:
            val_losses.append((step, rec["val_loss"]))

    done = r.start_step
    for step in range(r.start_step, cfg.max_steps):
        if any(evaluations_due(cfg, step, final=False)):
            evaluate_at(step)
        micro = [r.loader.next_batch() for _ in range(r.accum)]
        x = r.to_device(np.stack([b[0] for b in micro]), r.batch_sharding)  # (A, B, T), B over all processes
        y = r.to_device(np.stack([b[1] for b in micro]), r.batch_sharding)  # (A, B, T)
        r.state, metrics = r.train_step(r.state, x, y)
        flush()
        pending, done = (step, metrics), step + 1
        if done == cfg.max_steps:
            evaluate_at(done, final=True)
        if done % cfg.ckpt_interval == 0 or done == cfg.max_steps or interrupted():
            flush()
            r.ckpt.save(done, r.state, {"step": done, **r.meta, "loader": r.loader.state_dict()})
        if interrupted():
            break
    flush()
    return done, val_losses


def stop_diverged(r: Run, e: Diverged) -> UserError:
    """Set aside the checkpoints a divergence spoiled and say where the last good one is."""
    from flax_gpt.checkpoint import DIVERGED_SUFFIX

    spoiled = r.ckpt.set_aside([s for s in r.ckpt.all_steps() if s >= e.first_bad], DIVERGED_SUFFIX)
    last = r.ckpt.latest_step()
    kept = (f"the last good checkpoint is {r.out_dir / 'checkpoints' / str(last)}, --resume continues from it"
            if last is not None else "no good checkpoint was written")
    if spoiled:
        kept += f" (set aside: {', '.join(p.name for p in spoiled.values())})"
    r.metrics_log.write({"step": e.step, "stopped": f"diverged: {e}", "last_good_checkpoint": last})
    return UserError(f"training diverged: {e}; {kept}; try a lower --lr or more --warmup-steps")


# ----------------------------------------------------------------------------- the run


def run(cfg: TrainConfig, given: set[str] | None = None) -> dict:
    """Train as configured; returns a summary (steps, losses, paths, wall time). given: the fields set on the
    command line (default: those that differ from TrainConfig's defaults); on --resume the rest come from the
    checkpoint."""
    started = time.time()
    r, peak = setup(cfg, changed_fields(cfg) if given is None else given)
    cfg = r.cfg
    import jax
    from tqdm import tqdm

    from flax_gpt.metrics import flops_per_token

    show_bar = cfg.progress and r.is_main
    log_every = cfg.log_interval or (None if show_bar and sys.stdout.isatty() else 1)
    bar = tqdm(total=cfg.max_steps, initial=r.start_step, disable=not show_bar, unit="step", dynamic_ncols=True)
    record = StepRecorder(r, bar, flops_per_token(r.config, r.n_params, cfg.seq_len) * r.tokens_per_step, peak,
                          log_every)
    stop = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    try:
        done, val_losses = train(r, record, bar, lambda: bool(stop))
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(out_of_memory_message(cfg, r.dtype, r.platform, r.tokens_per_step)) from None
    except Diverged as e:
        raise stop_diverged(r, e) from None
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        r.ckpt.close()
        r.metrics_log.close()
    if r.is_main:
        draw_plots(r)
    ckpt_root = r.out_dir / "checkpoints"
    return {"start_step": r.start_step, "first_loss": record.first_loss, "last_loss": record.last_loss,
            "val_losses": val_losses, "steps": done - r.start_step, "final_step": r.ckpt.latest_step(),
            "wall_s": time.time() - started, "first_step_s": record.first_step_s,
            "checkpoint": str(ckpt_root / str(r.ckpt.latest_step())), "plot": str(r.out_dir / "loss.png"),
            "metrics": str(r.out_dir / "metrics.jsonl"), "interrupted": bool(stop), "is_main": r.is_main}


def is_out_of_memory(error: Exception) -> bool:
    """Whether a JAX runtime error is the device (or host) running out of memory."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def out_of_memory_message(cfg: TrainConfig, dtype: str, platform: str, tokens_per_step: int) -> str:
    """One line: what ran out, and which flags lower the memory a step needs."""
    return (f"out of memory on {platform} for a micro batch of {cfg.batch_size}x{cfg.seq_len} in {dtype}: lower "
            f"--batch-size (gradient accumulation keeps {tokens_per_step:,} tokens per step)"
            + ("" if cfg.remat else " or pass --remat (recomputes activations: about 1/3 more compute)"))


def _config_record(config: GPTConfig) -> dict:
    """The shape-defining fields of a model config (the numerics-only ones may change between runs)."""
    record = dataclasses.asdict(config)
    for numerics_only in ("dtype", "attention", "remat", "scan_layers", "matmul_output"):
        record.pop(numerics_only)
    return json.loads(json.dumps(record))


def _config_diff(saved, config: GPTConfig) -> str:
    """'n_embd 32 in the checkpoint, 64 requested': only the fields that differ."""
    wanted = _config_record(config)
    saved = saved if isinstance(saved, dict) else {}
    keys = [k for k in wanted if saved.get(k) != wanted[k]] + [k for k in saved if k not in wanted]
    return ", ".join(f"{k} {saved.get(k)} in the checkpoint, {wanted.get(k)} requested" for k in keys)


def _check_out_dir(out_dir: Path, ckpt_root: Path, resume: bool) -> None:
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
