"""Everything a training run needs before its first step: device, data, model and optimizer state, the jitted
steps, checkpoints and logs (on --resume: as the checkpoint says). `setup` makes a TrainRun."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx

from flax_gpt import devices, resume, train_step
from flax_gpt import sharding as shard
from flax_gpt.checkpoint import Checkpointer, abstract_like
from flax_gpt.config import GPTConfig
from flax_gpt.config import preset as model_preset
from flax_gpt.data import DataLoader, eval_batches, load, resolve_source
from flax_gpt.errors import UserError
from flax_gpt.load import load_model
from flax_gpt.metrics import MetricsLog, params_without_wpe, peak_flops
from flax_gpt.model import GPT
from flax_gpt.optim import OptimConfig, lr_schedule, make_optimizer, muon_labels
from flax_gpt.run_config import RUN_PRESETS, TrainConfig, grad_accum_steps, resolve
from flax_gpt.sinks import new_run_id, open_sinks
from flax_gpt.tokenizer import N_VOCAB, get_encoding
from flax_gpt.train_hellaswag import HellaSwagEval, hellaswag_eval, read_examples
from flax_gpt.train_step import TrainState

Sharding = jax.sharding.NamedSharding


@dataclasses.dataclass
class TrainRun:
    """Everything the step loop needs, made by setup()."""

    cfg: TrainConfig
    platform: str
    dtype: str
    out_dir: Path
    config: GPTConfig  # the model's
    graphdef: nnx.GraphDef
    state: TrainState  # step, params, opt_state
    train_step: Callable[..., tuple[TrainState, dict]]  # jitted (state, x (A, B, T), y (A, B, T)) -> (state, metrics)
    eval_step: Callable[..., jax.Array]  # jitted (params, x (B, T), y (B, T)) -> loss
    loader: DataLoader
    val_batches: list[tuple[np.ndarray, np.ndarray]]  # [(x (B, T), y (B, T))] this process's rows
    batch_sharding: Sharding | None  # None on one device
    eval_sharding: Sharding | None
    ckpt: Checkpointer
    metrics_log: MetricsLog
    meta: dict  # what every checkpoint's meta holds besides the loader state and the step
    accum: int
    tokens_per_step: int
    n_params: int
    is_main: bool
    start_step: int = 0
    hellaswag: HellaSwagEval | None = None  # of --hellaswag
    plotted_at: float = dataclasses.field(default_factory=time.monotonic)  # when the plots were last drawn

    def to_device(self, local: np.ndarray, sharding: Sharding | None) -> jax.Array:
        """This process's numpy rows as (its part of) a device array."""
        return jax.numpy.asarray(local) if sharding is None else shard.global_batch(local, sharding)

    def log(self, line: str) -> None:
        if self.is_main:
            print(line)


def model_config(cfg: TrainConfig, dtype: str, **numerics) -> GPTConfig:
    """The preset's model with the --n-layer/--n-head/--n-embd/--block-size overrides."""
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k)}
    try:
        return model_preset(RUN_PRESETS[cfg.preset].model, dtype=dtype, **overrides, **numerics)
    except ValueError as e:
        raise UserError(str(e)) from None


def init_model(cfg: TrainConfig, dtype: str, **numerics) -> GPT:
    """The starting model: fresh GPT-2 init, HF weights, or the params of a training checkpoint.

    numerics: GPTConfig fields that leave the parameters alone (remat, scan_layers, matmul_output, dropout, ...).
    """
    if cfg.init_from in (None, "scratch"):
        return GPT(model_config(cfg, dtype, **numerics), seed=cfg.seed)
    return load_model(cfg.init_from, dtype, **numerics)


def init_train_state(cfg: TrainConfig, dtype: str, numerics: dict, tx: optax.GradientTransformation, mesh=None,
                     strategy: str = "none"):
    """(model config, graphdef, TrainState, its shardings or None) of the run's starting model.

    Without a mesh the state is built on the default device. With one it is created already sharded: a fresh
    init runs under jit with the state's shardings as its outputs, and loaded weights wait on the host until each
    goes to its own shards, so no device ever holds the whole state.
    """
    if mesh is None:
        model = init_model(cfg, dtype, **numerics)
        return (model.config, *train_step.init_state(model, tx, cfg.seed), None)
    shardings_of = functools.partial(shard.state_shardings, mesh=mesh, strategy=strategy)
    if cfg.init_from in (None, "scratch"):
        config = model_config(cfg, dtype, **numerics)
        graphdef, init, shardings = train_step.sharded_init(lambda: GPT(config, seed=cfg.seed), tx, shardings_of,
                                                             cfg.seed)
        return config, graphdef, init(), shardings
    with jax.default_device(devices.host_device()):
        model = init_model(cfg, dtype, **numerics)
    return (model.config, *train_step.shard_state(model, tx, shardings_of, cfg.seed))


def setup(cfg: TrainConfig, given: set[str]) -> tuple[TrainRun, float | None]:
    """The run as configured (or as its checkpoint says, on --resume): (TrainRun, peak FLOP/s for MFU or None)."""
    if not cfg.resume:
        resolve(cfg)  # bad flags fail before JAX starts
    platform = devices.select_device(cfg.device)
    out_dir = Path(cfg.out_dir).expanduser()
    ckpt_root = out_dir / "checkpoints"
    resume.check_out_dir(out_dir, ckpt_root, cfg.resume)
    saved = resume.saved_meta(ckpt_root) if cfg.resume else {}
    if cfg.resume:
        cfg = resume.restored_config(cfg, given, saved.get("train_config", {}), ckpt_root, platform)
    cfg = resolve(cfg)
    examples = read_examples(cfg.hellaswag, cfg.hellaswag_limit)
    devices.enable_compile_cache()
    caps = devices.capabilities(platform)
    dtype = devices.compute_dtype(cfg.dtype, platform, training=True)

    source = resolve_source(cfg.data, Path.cwd())
    tokens = load(str(source), Path.cwd())
    data = resume.data_record(tokens)
    if cfg.resume:
        resume.check_same_data(saved.get("data"), data, ckpt_root)
    n_proc, proc = jax.process_count(), jax.process_index()
    strategy = shard.resolve_strategy(cfg.sharding)
    if strategy == "none" and n_proc > 1:
        raise UserError(f"--sharding none with {n_proc} processes would train {n_proc} unsynchronised copies into one "
                        "--out-dir; use --sharding dp or fsdp (auto picks dp)")
    if strategy != "none":
        shard.check_batch_divides(cfg.batch_size, n_proc, jax.local_device_count())
    accum = grad_accum_steps(cfg, n_proc)
    loader = DataLoader(tokens.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, process_index=proc,
                        process_count=n_proc)
    val_batches = eval_batches(tokens.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches, process_index=proc,
                               process_count=n_proc)

    optim_cfg = OptimConfig(lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, warmup_steps=max(cfg.warmup_steps, 1),
                            max_steps=cfg.decay_steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                            optimizer=cfg.optimizer, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum,
                            muon_weight_decay=cfg.muon_weight_decay)
    tx = make_optimizer(optim_cfg)
    mesh = shard.make_mesh() if strategy != "none" else None
    numerics = {"remat": cfg.remat, "scan_layers": cfg.scan_layers, "matmul_output": caps.matmul_output,
                "dropout": cfg.dropout,
                "attention": devices.attention_implementation(cfg.attention, platform, dtype, cfg.dropout,
                                                              cfg.seq_len)}
    config, graphdef, state, state_sh = init_train_state(cfg, dtype, numerics, tx, mesh, strategy)
    _check_model_fits_data(cfg, config)
    batch_sh = eval_sh = None
    if mesh is not None:
        batch_sh = shard.batch_sharding(mesh)
        eval_sh = Sharding(mesh, jax.sharding.PartitionSpec(shard.AXIS, None))
    _check_sample_prompt(cfg, config)
    params_sh = state_sh.params if state_sh else None
    hellaswag = hellaswag_eval(cfg.hellaswag, cfg.batch_size, examples, config, graphdef, params_sh, eval_sh, proc,
                               n_proc) if examples else None

    ckpt = Checkpointer(ckpt_root, keep=cfg.keep_checkpoints)
    start_step = 0
    if cfg.resume:  # the model is checked before the state is read: shapes differ otherwise
        state, restored = ckpt.restore(abstract_like(state),
                                       check_meta=lambda meta: resume.check_same_model(meta, config, ckpt_root))
        loader.load_state_dict(restored["loader"])
        start_step = int(state.step)
        resume.check_not_finished(start_step, cfg, ckpt_root)
    is_main = proc == 0
    meta = _checkpoint_meta(cfg, source, dtype, config, data, saved)
    sinks = open_sinks(out_dir, start_step, cfg.tensorboard, cfg.wandb_project, meta.get("wandb_run_id"),
                       meta["train_config"]) if is_main else []
    r = TrainRun(
        cfg=cfg, platform=platform, dtype=dtype, out_dir=out_dir, config=config, graphdef=graphdef, state=state,
        train_step=train_step.make_train_step(graphdef, tx, lr_schedule(optim_cfg), state_sh, batch_sh,
                                              donate=caps.donation),
        eval_step=train_step.make_eval_step(graphdef, params_sh, eval_sh),
        loader=loader, val_batches=val_batches, batch_sharding=batch_sh, eval_sharding=eval_sh, ckpt=ckpt,
        metrics_log=MetricsLog(out_dir / "metrics.jsonl", resume_from_step=start_step if cfg.resume else None,
                               enabled=is_main, sinks=sinks),
        meta=meta, accum=accum, tokens_per_step=accum * cfg.batch_size * cfg.seq_len * n_proc,
        n_params=params_without_wpe(state.params, config), is_main=is_main, start_step=start_step,
        hellaswag=hellaswag)
    step_devices = jax.local_devices() if strategy != "none" else jax.local_devices()[:1]  # in each process
    peak, peak_source = peak_flops(dtype, step_devices, n_proc)
    r.log(f"model: {r.n_params / 1e6:.1f}M params, {config.n_layer} layers, {config.n_embd} wide, dtype {dtype}, "
          f"{config.attention} attention on {platform}; data: {len(tokens.train):,} train / {len(tokens.val):,} val "
          f"tokens; batch {cfg.batch_size}x{cfg.seq_len} x {accum} accum x {n_proc} processes = "
          f"{r.tokens_per_step:,} tokens/step; {jax.device_count()} devices, sharding {strategy}")
    _log_run_notes(r, ckpt_root, peak, peak_source, caps, sinks)
    return r, peak


def _checkpoint_meta(cfg: TrainConfig, source: Path, dtype: str, config: GPTConfig, data: dict, saved: dict) -> dict:
    """What every checkpoint's meta holds besides the step and the loader: the model, the flags as resolved (paths
    absolute, dtype as trained), the data record, the W&B run id (a resumed run logs on into the same W&B run)."""
    saved_cfg = dataclasses.replace(cfg, data=str(source), extend_steps=0,
                                    dtype=devices.FLAG_DTYPES[dtype],
                                    hellaswag=cfg.hellaswag and str(Path(cfg.hellaswag).expanduser().resolve()))
    meta = {"model_config": resume.config_record(config), "train_config": dataclasses.asdict(saved_cfg),
            "data": data, "seed": cfg.seed}
    wandb_run_id = saved.get("wandb_run_id") or (new_run_id() if cfg.wandb_project else None)
    if wandb_run_id:
        meta["wandb_run_id"] = wandb_run_id
    return meta


def _log_run_notes(r: TrainRun, ckpt_root: Path, peak: float | None, peak_source: str, caps, sinks) -> None:
    """The lines after the model line: resume point, MFU peak, HellaSwag, sinks, fallbacks, the dtype note."""
    cfg = r.cfg
    if cfg.resume:
        r.log(f"resuming {ckpt_root} at step {r.start_step} of {cfg.max_steps}" +
              (f" (extended by {cfg.extend_steps}: lr {cfg.lr * cfg.min_lr_ratio:.3g} after step {cfg.decay_steps})"
               if cfg.extend_steps else ""))
    r.log(optimizer_line(cfg, r.state.params))
    r.log(f"mfu against {peak / 1e12:.3g} TFLOP/s: {peak_source}" if peak else f"note: mfu is not reported: {peak_source}")
    if r.hellaswag:
        rows, length = r.hellaswag.batches[0][0].shape
        r.log(f"hellaswag: {len(r.hellaswag.labels)} examples of {cfg.hellaswag} every "
              f"{cfg.hellaswag_interval or cfg.eval_interval} steps, {len(r.hellaswag.batches)} batches of "
              f"{rows * jax.process_count()}x{length} tokens")
    for sink in sinks:
        r.log(f"logging to {sink.where}")
    if caps.fallbacks():
        r.log(f"{r.platform} falls back to: {', '.join(caps.fallbacks())}")
    dtype_note = devices.auto_dtype_note(cfg.dtype, r.platform)
    if dtype_note:
        r.log(dtype_note)


def optimizer_line(cfg: TrainConfig, params) -> str:
    """The log line naming the optimizer and its settings (with Muon: how many weight matrices it updates)."""
    adamw = f"adamw (lr {cfg.lr:g}, weight decay {cfg.weight_decay:g})"
    if cfg.optimizer != "muon":
        return f"optimizer: {adamw}"
    n_muon = sum(math.prod(p.shape[:-2]) for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(muon_labels(params)))
                 if label == "muon")
    return (f"optimizer: muon on {n_muon} block weight matrices (lr {cfg.muon_lr:g}, momentum {cfg.muon_momentum:g}, "
            f"weight decay {cfg.muon_weight_decay:g}), {adamw} on embeddings, LayerNorms and biases")


def _check_sample_prompt(cfg: TrainConfig, config: GPTConfig) -> None:
    """The prompt must leave room in the context for at least one sampled token."""
    if cfg.sample_tokens == 0:
        return
    n = len(get_encoding().encode(cfg.sample_prompt, allowed_special="all"))
    if n >= config.block_size:
        raise UserError(f"--sample-prompt is {n} tokens, the model's context is {config.block_size}: "
                        "shorten it (or pass --sample-tokens 0)")


def _check_model_fits_data(cfg: TrainConfig, config: GPTConfig) -> None:
    """The data is GPT-2 tokens and T must fit the model: refuse a model that cannot read them."""
    if config.vocab_size < N_VOCAB:
        raise UserError(f"--init-from {cfg.init_from}: the model's vocabulary has {config.vocab_size} tokens, the data "
                        f"is GPT-2 tokens (ids up to {N_VOCAB - 1}); start from a model with GPT-2's vocabulary")
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's block_size {config.block_size}")
