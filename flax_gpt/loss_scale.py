"""float16 training's dynamic loss scaling, with torch.amp.GradScaler's semantics and defaults.

The loss's gradient is taken scaled by `scale` (so that small float16 gradients do not flush to zero) and unscaled in
float32 before clipping and AdamW. A step whose gradients hold an inf or NaN is skipped: parameters and AdamW's
moments and count stay as they were (as torch skips optimizer.step()), the scale halves and the count of good steps
restarts; after GROWTH_INTERVAL good steps in a row the scale doubles. The learning-rate schedule follows the
training step, skipped or not, as nanoGPT's get_lr(iter_num) does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

INIT_SCALE = 2.0**16  # GradScaler(init_scale=65536.0)
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000
# Below this the scaled gradients are below float16's smallest subnormal (2**-24) times the unscaled ones: the run
# stops (40 skipped steps in a row from the initial scale)
MIN_SCALE = 2.0**-24


@struct.dataclass
class LossScale:
    """The scaler's state, checkpointed with the train state."""

    scale: jax.Array  # float32 scalar: the loss is multiplied by it before the backward pass
    good_steps: jax.Array  # int32 scalar: steps without inf/NaN since the scale last changed (GradScaler's growth tracker)
    skipped: jax.Array  # int32 scalar: steps skipped so far in the run


def initial(scale: float = INIT_SCALE) -> LossScale:
    """The state before the first step."""
    return LossScale(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                     skipped=jnp.zeros((), jnp.int32))


def update(state: LossScale, finite, growth_interval: int = GROWTH_INTERVAL) -> LossScale:
    """GradScaler.update(): x0.5 and the tracker reset on inf/NaN, else x2 after growth_interval good steps."""
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= growth_interval
    scale = jnp.where(finite, jnp.where(grow, state.scale * GROWTH_FACTOR, state.scale), state.scale * BACKOFF_FACTOR)
    return LossScale(scale=scale, good_steps=jnp.where(grow, 0, good), skipped=state.skipped + (~finite).astype(jnp.int32))


def all_finite(grads) -> jax.Array:
    """Whether every gradient element is finite (GradScaler's found_inf, negated)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))


def keep_unless_finite(finite, new, old):
    """new where finite, else old: a skipped step's parameters and optimizer state. optax's schedule count still
    advances, so the learning rate follows the training step as in nanoGPT; AdamW's own count does not."""
    def pick(n, o):
        if isinstance(n, optax.ScaleByScheduleState):
            return n
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)

    return jax.tree.map(pick, new, old, is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))
