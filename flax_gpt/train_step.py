"""The jitted training and evaluation steps over a pure-pytree TrainState."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

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


def dropout_key(model: GPT, seed: int) -> jax.Array | None:
    """The train state's dropout key of a model (None without dropout), from the run's seed."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1) if model.config.dropout > 0 else None


def init_state(model: GPT, tx: optax.GradientTransformation, seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
    """Split a model into its static graph and a fresh TrainState."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, fresh_state(params, tx, dropout_key(model, seed))


def fresh_state(params: nnx.State, tx: optax.GradientTransformation, key: jax.Array | None = None) -> TrainState:
    """The TrainState of step 0: params, the optimizer's initial state, step 0, the dropout key."""
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), dropout_key=key)


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
    key = dropout_key(model, seed)
    shardings = shardings_of(jax.eval_shape(lambda p: fresh_state(p, tx, key), params))
    params = jax.tree.map(lambda p, s: jax.device_put(np.asarray(p), s), params, shardings.params)  # leaf by leaf
    state = jax.jit(lambda p: fresh_state(p, tx, key), out_shardings=shardings, donate_argnums=0)(params)
    return graphdef, state, shardings


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, x, y, dropout_key=None):
    """Mean cross entropy of one (B, T) batch: in train mode with the dropout key's masks, else in eval mode."""
    model = nnx.merge(graphdef, params)
    if dropout_key is None:
        model.eval()
    else:
        model.train()
    return model.loss(x, y, rngs=dropout_key)


def loss_and_grads(params: nnx.State, graphdef: nnx.GraphDef, x, y, dropout_key=None):
    """(mean cross entropy, gradients) of one (B, T) batch; with remat, flax_gpt.remat's backward pass."""
    if nnx.merge(graphdef, params).config.remat:
        return remat.loss_and_grads(params, graphdef, x, y, dropout_key)
    return jax.value_and_grad(loss_fn)(params, graphdef, x, y, dropout_key)


def micro_keys(state: TrainState, n_micro: int):
    """The dropout keys of this step's micro batches, (A, 2) uint32, or None without dropout."""
    if state.dropout_key is None:
        return None
    step_key = jax.random.fold_in(state.dropout_key, state.step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(n_micro))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule=None,
                    state_sharding=None, batch_sharding=None, donate: bool = True):
    """A jitted step(state, x, y) -> (state, metrics); x, y are (A, B, T): A micro batches accumulated.

    The loss and gradients are the mean over all A*B sequences, exactly as one batch A times
    larger; the state argument is donated (unless donate=False, for platforms that cannot reuse
    donated buffers), so its buffers are reused for the new state. With
    shardings (see flax_gpt.sharding) the step is compiled for them explicitly, metrics replicated.
    """
    grad_fn = loss_and_grads
    shardings = {}
    if state_sharding is not None:
        shardings = dict(in_shardings=(state_sharding, batch_sharding, batch_sharding),
                         out_shardings=(state_sharding, replicated(batch_sharding.mesh)))

    @functools.partial(jax.jit, donate_argnums=(0,) if donate else (), **shardings)
    def train_step(state: TrainState, x, y):
        def accumulate(carry, xyk):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(state.params, graphdef, *xyk)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        n_micro = x.shape[0]
        keys = micro_keys(state, n_micro)  # (A, 2) or None
        if n_micro == 1:  # no accumulation loop: its zeroed buffers and adds took 20% of a one-micro-batch step
            loss_sum, grad_sum = grad_fn(state.params, graphdef, x[0], y[0], None if keys is None else keys[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (x, y, keys))
        grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / n_micro, "grad_norm": optax.global_norm(grads)}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, dropout_key=state.dropout_key), metrics

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
