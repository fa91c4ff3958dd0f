"""The jitted training and evaluation steps over a pure-pytree TrainState."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from flax_gpt import loss_scale as scaler
from flax_gpt import remat
from flax_gpt.model import GPT
from flax_gpt.sharding import replicated


@struct.dataclass
class TrainState:
    """Everything a step changes or draws from: parameters, optimizer state, the step count, the dropout key."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: optimizer steps taken
    dropout_key: jax.Array | None = None  # uint32 (2,), with dropout: step s, micro batch i drop by fold_in(fold_in(key, s), i)
    loss_scale: scaler.LossScale | None = None  # float16 compute: the dynamic loss scale


def dropout_key(model: GPT, seed: int) -> jax.Array | None:
    """The train state's dropout key of a model (None without dropout), from the run's seed."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1) if model.config.dropout > 0 else None


def init_state(model: GPT, tx: optax.GradientTransformation, seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
    """Split a model into its static graph and a fresh TrainState."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, fresh_state(params, tx, dropout_key(model, seed), model.config.dtype == "float16")


def fresh_state(params: nnx.State, tx: optax.GradientTransformation, key: jax.Array | None = None,
                scaled: bool = False) -> TrainState:
    """The TrainState of step 0: params, the optimizer's initial state, step 0, the dropout key, with `scaled`
    (float16) the initial loss scale."""
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), dropout_key=key,
                      loss_scale=scaler.initial() if scaled else None)


def sharded_init(make_model: Callable[[], GPT], tx: optax.GradientTransformation, shardings_of, seed: int = 0):
    """(graphdef, init, shardings): init() returns a fresh TrainState created directly in its shardings.

    make_model (its random init included) runs inside the jitted init, whose outputs have the shardings that
    shardings_of gives the abstract state, so each device computes and holds only its own shards.
    """
    graphdef, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param)

    def build():
        return init_state(make_model(), tx, seed)[1]

    shardings = shardings_of(jax.eval_shape(build))
    return graphdef, jax.jit(build, out_shardings=shardings), shardings


def shard_state(model: GPT, tx: optax.GradientTransformation, shardings_of, seed: int = 0):
    """(graphdef, TrainState, shardings) of a model whose parameters sit on the host (loaded weights): each
    parameter goes to the devices with its own sharding, the optimizer state is created in its shardings."""
    graphdef, params = nnx.split(model, nnx.Param)
    key, scaled = dropout_key(model, seed), model.config.dtype == "float16"
    shardings = shardings_of(jax.eval_shape(lambda p: fresh_state(p, tx, key, scaled), params))
    params = jax.tree.map(lambda p, s: jax.device_put(np.asarray(p), s), params, shardings.params)  # leaf by leaf
    state = jax.jit(lambda p: fresh_state(p, tx, key, scaled), out_shardings=shardings, donate_argnums=0)(params)
    return graphdef, state, shardings


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, x, y, dropout_key=None, grad_scale=None):
    """Mean cross entropy of one (B, T) batch: in train mode with the dropout key's masks, else in eval mode.
    grad_scale: the cotangent its gradient will be taken with (float16's loss scale), see GPT.loss."""
    model = nnx.merge(graphdef, params)
    if dropout_key is None:
        model.eval()
    else:
        model.train()
    return model.loss(x, y, rngs=dropout_key, grad_scale=grad_scale)


def loss_and_grads(params: nnx.State, graphdef: nnx.GraphDef, x, y, dropout_key=None, grad_scale=None):
    """(mean cross entropy, gradients) of one (B, T) batch, the gradients times grad_scale when one is given (the
    loss itself unscaled); with remat, flax_gpt.remat's backward pass."""
    if nnx.merge(graphdef, params).config.remat:
        return remat.loss_and_grads(params, graphdef, x, y, dropout_key, grad_scale)
    if grad_scale is None:
        return jax.value_and_grad(loss_fn)(params, graphdef, x, y, dropout_key)
    loss, vjp = jax.vjp(lambda p: loss_fn(p, graphdef, x, y, dropout_key, grad_scale), params)
    return loss, vjp(grad_scale.astype(loss.dtype))[0]


def micro_keys(state: TrainState, n_micro: int):
    """The dropout keys of this step's micro batches, (A, 2) uint32, or None without dropout."""
    if state.dropout_key is None:
        return None
    step_key = jax.random.fold_in(state.dropout_key, state.step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(n_micro))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule=None,
                    state_sharding=None, batch_sharding=None, donate: bool = True,
                    growth_interval: int = scaler.GROWTH_INTERVAL):
    """A jitted step(state, x, y) -> (state, metrics); x, y are (A, B, T): A micro batches accumulated.

    The loss and gradients are the mean over all A*B sequences, exactly as one batch A times
    larger; the state argument is donated (unless donate=False, for platforms that cannot reuse
    donated buffers), so its buffers are reused for the new state. With
    shardings (see flax_gpt.sharding) the step is compiled for them explicitly, metrics replicated. A state with a
    loss scale (float16) takes scaled gradients and skips a step whose gradients overflow (flax_gpt.loss_scale);
    its metrics then hold loss_scale, skipped and skipped_steps too.
    """
    grad_fn = loss_and_grads
    shardings = {}
    if state_sharding is not None:
        shardings = dict(in_shardings=(state_sharding, batch_sharding, batch_sharding),
                         out_shardings=(state_sharding, replicated(batch_sharding.mesh)))

    @functools.partial(jax.jit, donate_argnums=(0,) if donate else (), **shardings)
    def train_step(state: TrainState, x, y):
        scale = None if state.loss_scale is None else state.loss_scale.scale

        def accumulate(carry, xyk):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(state.params, graphdef, *xyk, scale)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        n_micro = x.shape[0]
        keys = micro_keys(state, n_micro)  # (A, 2) or None
        if n_micro == 1:  # no accumulation loop: its zeroed buffers and adds took 20% of a one-micro-batch step
            loss_sum, grad_sum = grad_fn(state.params, graphdef, x[0], y[0], None if keys is None else keys[0], scale)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (x, y, keys))
        divisor = n_micro if scale is None else n_micro * scale  # unscaled in float32, as GradScaler.unscale_
        grads = jax.tree.map(lambda g: g / divisor, grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / n_micro, "grad_norm": optax.global_norm(grads)}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        loss_scale = state.loss_scale
        if loss_scale is not None:
            finite = scaler.all_finite(grads)
            params, opt_state = scaler.keep_unless_finite(finite, (params, opt_state), (state.params, state.opt_state))
            loss_scale = scaler.update(loss_scale, finite, growth_interval)
            metrics |= {"loss_scale": scale, "skipped": ~finite, "skipped_steps": loss_scale.skipped}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, dropout_key=state.dropout_key,
                          loss_scale=loss_scale), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, params_sharding=None, batch_sharding=None):
    """A jitted eval(params, x, y) -> mean loss of a (B, T) batch."""
    shardings = {}
    if params_sharding is not None:
        shardings = dict(in_shardings=(params_sharding, batch_sharding, batch_sharding),
                         out_shardings=replicated(batch_sharding.mesh))

    @functools.partial(jax.jit, **shardings)
    def eval_step(params: nnx.State, x, y):
        return loss_fn(params, graphdef, x, y)

    return eval_step
