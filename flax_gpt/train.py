"""The training run behind `python train.py`: data, model, jitted steps, eval, checkpoints, plots."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Literal

import numpy as np

from flax_gpt import devices
from flax_gpt.config import GPTConfig
from flax_gpt.config import preset as model_preset
from flax_gpt.errors import UserError


@dataclasses.dataclass
class TrainConfig:
    """Train a GPT-2 on a text corpus (defaults come from --preset; every field is a flag)."""

    preset: str = "small"  # run recipe: tiny (seconds), small (CPU, ~5 min), gpt2 (124M, build-nanogpt's GPU run)
    data: str | None = None  # token shards dir or .txt/.jsonl/.parquet file(s); default ./input.txt, else Shakespeare
    out_dir: str = "out"  # checkpoints/, metrics.jsonl and loss.png go here
    init_from: str = "scratch"  # scratch | an HF hub id (gpt2, ...) | an HF directory | a checkpoint directory
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    max_steps: int | None = None  # optimizer steps
    batch_size: int | None = None  # sequences per micro batch (B)
    seq_len: int | None = None  # tokens per sequence (T), at most the model's block_size
    total_batch_size: int | None = None  # tokens per optimizer step; a multiple of B*T (gradient accumulation)
    lr: float | None = None  # max learning rate
    min_lr_ratio: float = 0.1  # min_lr = lr * min_lr_ratio, reached at max_steps
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int | None = None  # steps between val-loss evaluations (and samples)
    eval_batches: int | None = None  # val batches per evaluation
    ckpt_interval: int | None = None  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3
    sample_tokens: int = 64  # tokens sampled at each evaluation; 0 turns sampling off
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "metal"] = "auto"
    sharding: Literal["auto", "none", "dp", "fsdp"] = "auto"  # auto: dp when more than one device is visible
    remat: bool = False  # recompute block activations in the backward pass: less memory, ~1/3 more compute
    scan_layers: bool = False  # rolled layer loop: compile time flat in depth (gpt2-xl fwd+bwd 1.3 s, not 11 s), slower steps
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # compute dtype; auto: bf16 on GPU/TPU, fp32 on CPU
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto: cuDNN flash attention on CUDA in bf16, else XLA's
    n_layer: int | None = None  # model overrides of the preset's shape (scratch runs only)
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    progress: bool = True  # show a progress bar
    debug: bool = False  # show tracebacks instead of one-line errors


@dataclasses.dataclass(frozen=True)
class RunPreset:
    model: str
    batch_size: int
    seq_len: int
    total_batch_size: int
    max_steps: int
    lr: float
    warmup_steps: int
    eval_interval: int
    eval_batches: int
    ckpt_interval: int


RUN_PRESETS = {
    "tiny": RunPreset("tiny", batch_size=8, seq_len=64, total_batch_size=512, max_steps=40, lr=3e-3,
                      warmup_steps=4, eval_interval=20, eval_batches=2, ckpt_interval=20),
    "small": RunPreset("small", batch_size=8, seq_len=128, total_batch_size=1024, max_steps=350, lr=2e-3,
                       warmup_steps=20, eval_interval=50, eval_batches=8, ckpt_interval=100),
    "gpt2": RunPreset("gpt2", batch_size=64, seq_len=1024, total_batch_size=524288, max_steps=19073, lr=6e-4,
                      warmup_steps=715, eval_interval=250, eval_batches=20, ckpt_interval=5000),
}


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill unset fields from the run preset and check every size."""
    if cfg.preset not in RUN_PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose one of: {', '.join(RUN_PRESETS)}")
    base = RUN_PRESETS[cfg.preset]
    filled = {f: getattr(base, f) for f in ("batch_size", "seq_len", "max_steps", "lr", "warmup_steps",
                                             "eval_interval", "eval_batches", "ckpt_interval")
              if getattr(cfg, f) is None}
    cfg = dataclasses.replace(cfg, **filled)
    for name in ("max_steps", "batch_size", "seq_len", "total_batch_size", "eval_interval", "eval_batches",
                 "ckpt_interval", "keep_checkpoints"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.warmup_steps < 0 or cfg.sample_tokens < 0:
        raise UserError("--lr must be positive and --warmup-steps, --sample-tokens non-negative")
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


def enable_compile_cache() -> None:
    """Keep compiled steps under $FLAX_GPT_CACHE/xla, so a rerun skips compiling (gpt2 fp32: 4.7 -> 0.3 s).

    JAX_COMPILATION_CACHE_DIR, when set, wins; an unwritable cache directory only means compiling every time.
    """
    import jax

    from flax_gpt.data import cache_dir

    if jax.config.jax_compilation_cache_dir:
        return
    xla_cache = cache_dir() / "xla"
    try:
        xla_cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", str(xla_cache))


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

    if cfg.init_from == "scratch":
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
    if cfg.init_from == "scratch":
        config = _model_config(cfg, dtype, **numerics)
        graphdef, init, shardings = sharded_init(lambda: GPT(config, seed=cfg.seed), tx, shardings_of)
        return config, graphdef, init(), shardings
    with jax.default_device(_host_device()):
        model = init_model(cfg, dtype, **numerics)
    return (model.config, *shard_state(model, tx, shardings_of))


def _host_device():
    """A CPU device of this process (None if JAX runs without its CPU backend)."""
    import jax

    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------- the run


class Diverged(Exception):
    """The loss or the gradient norm became NaN or infinite at optimizer step `step`.

    first_bad: the first checkpoint step whose parameters are not to be trusted (the loss of step s
    is computed from checkpoint s's parameters; a NaN gradient at step s spoils checkpoint s + 1).
    """

    def __init__(self, step: int, first_bad: int, message: str):
        super().__init__(message)
        self.step, self.first_bad = step, first_bad


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (steps, losses, paths, wall time)."""
    started = time.time()
    cfg = resolve(cfg)
    platform = devices.select_device(cfg.device)
    caps = devices.capabilities(platform)
    dtype = devices.compute_dtype(cfg.dtype, platform)
    enable_compile_cache()

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from flax_gpt import data as data_lib
    from flax_gpt import sharding as shard
    from flax_gpt.checkpoint import DIVERGED_SUFFIX, Checkpointer, abstract_like
    from flax_gpt.generate import generate
    from flax_gpt.metrics import MetricsLog, flops_per_token, mfu, peak_device_memory_gib, peak_flops, plot_losses
    from flax_gpt.optim import OptimConfig, lr_schedule, make_optimizer
    from flax_gpt.tokenizer import get_encoding
    from flax_gpt.train_step import make_eval_step, make_train_step

    out_dir = Path(cfg.out_dir).expanduser()
    ckpt_root = out_dir / "checkpoints"
    _check_out_dir(out_dir, ckpt_root, cfg.resume)

    tokens = data_lib.load(cfg.data, Path.cwd())
    n_proc, proc = jax.process_count(), jax.process_index()
    is_main = proc == 0
    accum = grad_accum_steps(cfg, n_proc)
    strategy = shard.resolve_strategy(cfg.sharding)
    if strategy != "none":
        shard.check_batch_divides(cfg.batch_size, n_proc, jax.local_device_count())
    loader = data_lib.DataLoader(tokens.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                 process_index=proc, process_count=n_proc)
    val_batches = data_lib.eval_batches(tokens.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                                        process_index=proc, process_count=n_proc)

    optim_cfg = OptimConfig(lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, warmup_steps=max(cfg.warmup_steps, 1),
                            max_steps=cfg.max_steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    tx = make_optimizer(optim_cfg)
    mesh = shard.make_mesh() if strategy != "none" else None
    numerics = {"remat": cfg.remat, "scan_layers": cfg.scan_layers, "matmul_output": caps.matmul_output,
                "attention": devices.attention_implementation(cfg.attention, platform, dtype)}
    config, graphdef, state, state_sh = init_train_state(cfg, dtype, numerics, tx, mesh, strategy)
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's block_size {config.block_size}")
    batch_sh = eval_batch_sh = None
    if mesh is not None:
        batch_sh = shard.batch_sharding(mesh)
        eval_batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shard.AXIS, None))

    def to_device(local, sharding):
        """This process's numpy rows as (its part of) a device array."""
        return jnp.asarray(local) if sharding is None else shard.global_batch(local, sharding)

    ckpt = Checkpointer(ckpt_root, keep=cfg.keep_checkpoints)
    start_step = 0
    if cfg.resume:
        def same_model(meta: dict) -> None:  # checked before the state is read: shapes differ otherwise
            if meta.get("model_config") != _config_record(config):
                raise UserError(f"--resume: {ckpt_root} holds another model ({_config_diff(meta.get('model_config'), config)}"
                                "); pass the model flags of the run being resumed, or a new --out-dir")

        state, meta = ckpt.restore(abstract_like(state), check_meta=same_model)
        loader.load_state_dict(meta["loader"])
        start_step = int(state.step)
        if start_step >= cfg.max_steps:  # nothing to redo: MetricsLog would drop the final val record
            raise UserError(f"--resume: {ckpt_root} is at step {start_step}, the run is finished "
                            f"(--max-steps {cfg.max_steps}); pass a larger --max-steps to train on")
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", resume_from_step=start_step if cfg.resume else None,
                             enabled=is_main)

    train_step = make_train_step(graphdef, tx, lr_schedule(optim_cfg), state_sh, batch_sh, donate=caps.donation)
    eval_step = make_eval_step(graphdef, state_sh.params if state_sh else None, eval_batch_sh)
    enc = get_encoding()
    n_params = sum(x.size for x in jax.tree.leaves(state.params)) - config.block_size * config.n_embd
    tokens_per_step = accum * cfg.batch_size * cfg.seq_len * n_proc
    flops_per_step = flops_per_token(config, n_params, cfg.seq_len) * tokens_per_step
    step_devices = jax.local_devices() if strategy != "none" else jax.local_devices()[:1]  # in each process
    peak, peak_source = peak_flops(dtype, step_devices, n_proc)
    log = print if is_main else (lambda *a, **k: None)
    log(f"model: {n_params / 1e6:.1f}M params, {config.n_layer} layers, {config.n_embd} wide, dtype {dtype}, "
        f"{config.attention} attention on "
          f"{platform}; data: {len(tokens.train):,} train / {len(tokens.val):,} val tokens; "
          f"batch {cfg.batch_size}x{cfg.seq_len} x {accum} accum x {n_proc} processes = {tokens_per_step:,} tokens/step; "
          f"{jax.device_count()} devices, sharding {strategy}")
    log(f"mfu against {peak / 1e12:.3g} TFLOP/s: {peak_source}" if peak else f"note: mfu is not reported: {peak_source}")
    if caps.fallbacks():
        log(f"{platform} falls back to: {', '.join(caps.fallbacks())}")

    def meta_record(step: int) -> dict:
        return {"step": step, "model_config": _config_record(config), "loader": loader.state_dict(),
                "train_config": dataclasses.asdict(cfg), "seed": cfg.seed}

    def evaluate(params) -> float:
        losses = [eval_step(params, to_device(x, eval_batch_sh), to_device(y, eval_batch_sh)) for x, y in val_batches]
        return float(np.mean(jax.device_get(losses)))

    def sample(params) -> str:
        if cfg.sample_tokens == 0:
            return ""
        from flax import nnx

        n_new = min(cfg.sample_tokens, config.block_size - 1)
        ids = generate(nnx.merge(graphdef, params), [[enc.eot_token]], n_new, temperature=1.0, top_k=50, seed=cfg.seed)
        return enc.decode([int(t) for t in ids[0, 1:]])

    interrupted = {"flag": False}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (cfg.progress and is_main), unit="step",
               dynamic_ncols=True)
    summary = {"start_step": start_step, "first_loss": None, "last_loss": None, "val_losses": []}
    pending = None  # (step, device metrics) of the step in flight: read after the next one is queued
    last_time = time.perf_counter()
    first_step_time = None
    step = start_step

    def record(step_done: int, device_metrics) -> None:
        nonlocal last_time, first_step_time
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        if first_step_time is None:
            first_step_time = dt
        if not math.isfinite(m["loss"]):
            raise Diverged(step_done, step_done, f"loss is {m['loss']} at step {step_done}")
        if not math.isfinite(m["grad_norm"]):  # the update of this step made the parameters NaN
            raise Diverged(step_done, step_done + 1, f"gradient norm is {m['grad_norm']} at step {step_done}")
        rec = {"step": step_done, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
               "ms_per_step": dt * 1e3, "tokens_per_s": tokens_per_step / dt, "mfu": mfu(flops_per_step / dt, peak)}
        metrics_log.write(rec)
        summary["first_loss"] = summary["first_loss"] if summary["first_loss"] is not None else m["loss"]
        summary["last_loss"] = m["loss"]
        shown = {"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] is not None else {}
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", **shown, refresh=False)
        bar.update(1)

    def eval_and_sample(steps_done: int) -> None:
        val_loss = evaluate(state.params)
        text = sample(state.params)
        peak_memory = peak_device_memory_gib()
        metrics_log.write({"step": steps_done, "val_loss": val_loss, "sample": text}
                          | ({} if peak_memory is None else {"peak_device_memory_GiB": peak_memory}))
        summary["val_losses"].append((steps_done, val_loss))
        memory = "" if peak_memory is None else f" | peak device memory {peak_memory:.1f} GiB"
        (bar.write if is_main else log)(f"step {steps_done:5d} | val loss {val_loss:.4f}{memory} | sample: {text[:200]!r}")

    try:
        for step in range(start_step, cfg.max_steps):
            if step % cfg.eval_interval == 0:
                if pending is not None:
                    record(*pending)
                    pending = None
                eval_and_sample(step)  # val loss of the parameters after `step` steps
            micro = [loader.next_batch() for _ in range(accum)]
            x = to_device(np.stack([b[0] for b in micro]), batch_sh)  # (A, B, T), B over all processes
            y = to_device(np.stack([b[1] for b in micro]), batch_sh)  # (A, B, T)
            state, metrics = train_step(state, x, y)
            if pending is not None:
                record(*pending)
            pending = (step, metrics)
            done = step + 1
            is_last = done == cfg.max_steps
            if is_last:
                record(*pending)
                pending = None
                eval_and_sample(done)
            if done % cfg.ckpt_interval == 0 or is_last or interrupted["flag"]:
                if pending is not None:
                    record(*pending)
                    pending = None
                ckpt.save(done, state, meta_record(done))
            if interrupted["flag"]:
                break
        if pending is not None:
            record(*pending)
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        bar.close()
        raise UserError(out_of_memory_message(cfg, dtype, platform, tokens_per_step)) from None
    except Diverged as e:
        bar.close()
        spoiled = ckpt.set_aside([s for s in ckpt.all_steps() if s >= e.first_bad], DIVERGED_SUFFIX)
        last = ckpt.latest_step()
        ckpt.close()
        kept = (f"the last good checkpoint is {ckpt_root / str(last)}, --resume continues from it"
                if last is not None else "no good checkpoint was written")
        if spoiled:
            kept += f" (set aside: {', '.join(p.name for p in spoiled.values())})"
        metrics_log.write({"step": e.step, "stopped": f"diverged: {e}", "last_good_checkpoint": last})
        raise UserError(f"training diverged: {e}; {kept}; try a lower --lr or more --warmup-steps") from None
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    bar.close()
    ckpt.close()

    if is_main:
        plot_losses(metrics_log.read(), out_dir / "loss.png", title=f"flax-gpt {cfg.preset}: {n_params / 1e6:.1f}M params")
    summary.update(steps=step + 1 - start_step, final_step=ckpt.latest_step(), wall_s=time.time() - started,
                   first_step_s=first_step_time, checkpoint=str(ckpt_root / str(ckpt.latest_step())),
                   plot=str(out_dir / "loss.png"), metrics=str(out_dir / "metrics.jsonl"),
                   interrupted=interrupted["flag"], is_main=is_main)
    return summary


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
