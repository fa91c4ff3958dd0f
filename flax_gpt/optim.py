"""build-nanogpt's optimizer in optax: clip 1.0, AdamW(0.9, 0.95, eps 1e-8), warmup + cosine; or Muon for the
blocks' weight matrices with AdamW for the rest."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from flax_gpt.muon import muon


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Learning-rate schedule and AdamW settings (defaults: build-nanogpt's GPT-2 124M run)."""

    lr: float = 6e-4  # max learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # min_lr = lr * min_lr_ratio
    warmup_steps: int = 715
    max_steps: int = 19073  # cosine reaches min_lr here and stays there
    weight_decay: float = 0.1  # only on parameters with 2 or more dims
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' weight matrices, AdamW on the rest)
    muon_lr: float = 0.01  # Muon's max learning rate; the same warmup and cosine, scaled
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


def lr_at(step: int, cfg: OptimConfig) -> float:
    """build-nanogpt's get_lr(it), in plain Python: the reference for the optax schedule."""
    max_lr, min_lr = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return max_lr * (step + 1) / cfg.warmup_steps
    if step > cfg.max_steps:
        return min_lr
    decay_ratio = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """The same formula on a traced step count, for use inside jit."""
    max_lr, min_lr = cfg.lr, cfg.lr * cfg.min_lr_ratio
    decay_span = max(cfg.max_steps - cfg.warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = max_lr * (step + 1) / cfg.warmup_steps
        decay_ratio = jnp.clip((step - cfg.warmup_steps) / decay_span, 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * decay_ratio)) * (max_lr - min_lr)
        return jnp.where(step < cfg.warmup_steps, warmup, jnp.where(step > cfg.max_steps, min_lr, cosine))

    return schedule


def decay_mask(params):
    """True for parameters that get weight decay: matmul kernels and embeddings (ndim >= 2).

    Stacked block parameters carry a leading layer axis, so their own rank is ndim - 1.
    """
    def per_leaf(path, p):
        return _rank(path, p) >= 2

    return jax.tree_util.tree_map_with_path(per_leaf, params)


def _in_block(path) -> bool:
    """Whether a parameter's path is under "h", the stacked blocks (a leading layer axis)."""
    return any(getattr(k, "key", None) == "h" for k in path[:1])


def _rank(path, p) -> int:
    """A parameter's own rank: stacked block parameters carry a leading layer axis."""
    return p.ndim - 1 if _in_block(path) else p.ndim


def muon_labels(params):
    """"muon" for the blocks' weight matrices (attention and MLP kernels), "adamw" for the embeddings (and so the
    tied head), LayerNorm gains and biases, as the speedrun splits them."""
    def per_leaf(path, p):
        return "muon" if _in_block(path) and _rank(path, p) == 2 else "adamw"

    return jax.tree_util.tree_map_with_path(per_leaf, params)


def muon_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Muon's learning rate: the warmup-cosine schedule with muon_lr as its peak."""
    schedule, ratio = lr_schedule(cfg), cfg.muon_lr / cfg.lr
    return lambda step: schedule(step) * ratio


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW with the warmup-cosine schedule (with --optimizer muon: Muon on
    the blocks' weight matrices, AdamW on the other parameters)."""
    tx = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "muon":
        tx = optax.multi_transform(
            {"adamw": tx, "muon": muon(muon_schedule(cfg), cfg.muon_momentum, cfg.muon_weight_decay)}, muon_labels)
    if cfg.grad_clip <= 0:
        return tx
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
