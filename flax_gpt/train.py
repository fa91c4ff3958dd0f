"""The training loop behind `python train.py`: `run` sets the run up (run_setup), then steps from the start (or the
checkpoint) to --max-steps with evaluations, HellaSwag, samples and checkpoints at their intervals, and draws the
plots. Each step's metrics go to metrics.jsonl (and its sinks), the progress bar and the log line."""

from __future__ import annotations

import math
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from flax_gpt import generate, loss_scale, run_setup, train_hellaswag
from flax_gpt.checkpoint import DIVERGED_SUFFIX
from flax_gpt.errors import UserError
from flax_gpt.metrics import flops_per_token, mfu, peak_device_memory_gib
from flax_gpt.plot import panels_of, plot_losses, plot_runs
from flax_gpt.run_config import TrainConfig, changed_fields
from flax_gpt.run_setup import TrainRun
from flax_gpt.tokenizer import get_encoding


class Diverged(Exception):
    """The loss or the gradient norm became NaN or infinite at optimizer step `step`.

    first_bad: the first checkpoint step whose parameters are not to be trusted (the loss of step s
    is computed from checkpoint s's parameters; a NaN gradient at step s spoils checkpoint s + 1).
    """

    def __init__(self, step: int, first_bad: int, message: str):
        super().__init__(message)
        self.step, self.first_bad = step, first_bad


class StepRecorder:
    """Each step's device metrics -> a metrics.jsonl record, the progress bar, a log line; NaN/inf -> Diverged,
    except on a float16 step the loss scaler skipped (a loss scale that collapses stops the run)."""

    def __init__(self, r: TrainRun, bar, flops_per_step: float, peak: float | None, log_every: int | None):
        self.r, self.bar, self.flops_per_step, self.peak, self.log_every = r, bar, flops_per_step, peak, log_every
        self.last_time = time.perf_counter()
        self.first_step_s = self.first_loss = self.last_loss = None

    def __call__(self, step: int, device_metrics) -> None:
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        dt, self.last_time = now - self.last_time, now
        self.first_step_s = dt if self.first_step_s is None else self.first_step_s
        skipped = bool(m.get("skipped", False))
        if skipped:
            check_loss_scale(m["loss_scale"] * loss_scale.BACKOFF_FACTOR, step, int(m["skipped_steps"]))
        elif not math.isfinite(m["loss"]):
            raise Diverged(step, step, f"loss is {m['loss']} at step {step}")
        elif not math.isfinite(m["grad_norm"]):  # the update of this step made the parameters NaN
            raise Diverged(step, step + 1, f"gradient norm is {m['grad_norm']} at step {step}")
        rec = {"step": step, "loss": finite_or_none(m["loss"]), "lr": m["lr"], "grad_norm": finite_or_none(m["grad_norm"]),
               "ms_per_step": dt * 1e3, "tokens_per_s": self.r.tokens_per_step / dt,
               "mfu": mfu(self.flops_per_step / dt, self.peak)}
        if "loss_scale" in m:  # float16: the scale this step ran with, whether it was skipped, skips so far
            rec |= {"loss_scale": m["loss_scale"], "skipped": skipped, "skipped_steps": int(m["skipped_steps"])}
        self.r.metrics_log.write(rec)
        self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = m["loss"]
        shown = {"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] is not None else {}
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}", **shown, refresh=False)
        self.bar.update(1)
        if self.log_every and step % self.log_every == 0 and self.r.is_main:  # build-nanogpt's line
            scaled = (f" | scale {m['loss_scale']:.0f}" + (f" | skipped (inf/nan gradients; {rec['skipped_steps']} so far)"
                                                          if skipped else "")) if "loss_scale" in m else ""
            self.bar.write(f"step {step:5d} | loss {m['loss']:.6f} | lr {m['lr']:.4e} | norm {m['grad_norm']:.4f} | "
                           f"dt {dt * 1e3:.2f}ms | tok/s {rec['tokens_per_s']:,.0f}{scaled}", file=sys.stdout)


def finite_or_none(x: float) -> float | None:
    """x, or None (JSON null) for an inf or NaN (a skipped float16 step's gradient norm)."""
    return x if math.isfinite(x) else None


def check_loss_scale(scale: float, step: int, skipped: int) -> None:
    """Stop a float16 run whose loss scale has collapsed: its gradients overflow even unscaled."""
    if scale < loss_scale.MIN_SCALE:
        raise UserError(f"the float16 loss scale fell to {scale:.1e} at step {step} ({skipped} steps skipped on inf/NaN "
                        "gradients): the model overflows float16 even unscaled; train with --dtype bf16 or fp32, or a "
                        "lower --lr")


def evaluate(r: TrainRun) -> float:
    """Mean val loss of the current parameters over the fixed val batches (all processes)."""
    losses = [r.eval_step(r.state.params, r.to_device(x, r.eval_sharding), r.to_device(y, r.eval_sharding))
              for x, y in r.val_batches]
    return float(np.mean(jax.device_get(losses)))


def hellaswag(r: TrainRun) -> dict:
    """HellaSwag acc, acc_norm, n and correct counts of the current parameters (all processes)."""
    return train_hellaswag.score(r.hellaswag, r.state.params, lambda rows: r.to_device(rows, r.eval_sharding))


def sample(r: TrainRun, step: int) -> str:
    """--sample-tokens tokens after --sample-prompt (top-k 50, seed --seed + step), decoded with the prompt unless
    it is <|endoftext|>; '' when sampling is off."""
    if r.cfg.sample_tokens == 0:
        return ""
    enc = get_encoding()
    prompt = enc.encode(r.cfg.sample_prompt, allowed_special="all")
    n_new = min(r.cfg.sample_tokens, r.config.block_size - len(prompt))
    ids = generate.generate(nnx.merge(r.graphdef, r.state.params), [prompt], n_new, temperature=1.0, top_k=50,
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


def eval_and_sample(r: TrainRun, step: int, bar, final: bool = False) -> dict:
    """The evaluations due after `step` steps (val loss + sample, HellaSwag) into metrics.jsonl, the sinks and the
    log, and the plots redrawn (at most every PLOT_EVERY_S); returns the record."""
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


def draw_plots(r: TrainRun) -> None:
    """loss.png (train and val loss) and metrics.png (every panel) of the run so far, from metrics.jsonl."""
    runs = {r.out_dir.name: r.metrics_log.read()}
    title = f"flax-gpt {r.cfg.preset}: {r.n_params / 1e6:.1f}M params"
    plot_losses(runs[r.out_dir.name], r.out_dir / "loss.png", title=title)
    if panels_of(runs):  # none before the first record
        plot_runs(runs, r.out_dir / "metrics.png", title=title)
    r.plotted_at = time.monotonic()


def train(r: TrainRun, record: StepRecorder, bar, interrupted) -> tuple[int, list]:
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


def stop_diverged(r: TrainRun, e: Diverged) -> UserError:
    """Set aside the checkpoints a divergence spoiled and say where the last good one is."""
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
    r, peak = run_setup.setup(cfg, changed_fields(cfg) if given is None else given)
    cfg = r.cfg
    show_bar = cfg.progress and r.is_main and sys.stderr.isatty()  # a log file gets lines, not a bar
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
