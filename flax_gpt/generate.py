"""Sampling from a GPT: temperature, top-k and top-p, compiled once per (batch, length).

Each new token recomputes the forward pass over a fixed-size token buffer (positions past
the current one are masked out by causality), so shapes never change while decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_gpt.errors import UserError
from flax_gpt.model import GPT


def filter_logits(logits, temperature: float, top_k: int | None, top_p: float | None):
    """Scale by temperature and mask (to -inf) what top-k / top-p exclude: logits (B, V)."""
    logits = logits / temperature  # (B, V)
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V) descending
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)  # (B, V)
        n_keep = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)  # (B, 1)
        cutoff = jnp.take_along_axis(sorted_logits, jnp.maximum(n_keep - 1, 0), axis=-1)  # (B, 1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "temperature", "top_k", "top_p"))
def _decode(graphdef, params, buffer, key, prompt_len: int, temperature: float, top_k, top_p):
    """Fill buffer (B, L) from position prompt_len on, one sampled token at a time."""

    def body(t, buffer):
        logits, _ = nnx.merge(graphdef, params)(buffer)  # (B, L, V)
        last = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)  # (B, V)
        if temperature == 0:
            next_id = jnp.argmax(last, axis=-1)  # (B,)
        else:
            filtered = filter_logits(last, temperature, top_k, top_p)
            next_id = jax.random.categorical(jax.random.fold_in(key, t), filtered, axis=-1)  # (B,)
        return jax.lax.dynamic_update_index_in_dim(buffer, next_id.astype(buffer.dtype)[:, None], t, axis=1)

    return jax.lax.fori_loop(prompt_len, buffer.shape[1], body, buffer)


def generate(model: GPT, idx, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> np.ndarray:
    """Continue prompts idx (B, T0) by max_new_tokens tokens; returns (B, T0 + max_new_tokens) ids."""
    idx = np.asarray(idx, np.int32)
    B, T0 = idx.shape
    total = T0 + max_new_tokens
    if T0 < 1:
        raise UserError("the prompt is empty; give at least one token")
    if total > model.config.block_size:
        raise UserError(f"prompt ({T0} tokens) + {max_new_tokens} new tokens = {total} exceeds the "
                        f"model's context of {model.config.block_size}; shorten the prompt or --max-new-tokens")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise UserError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    buffer = np.zeros((B, total), np.int32)  # (B, L)
    buffer[:, :T0] = idx
    graphdef, params = nnx.split(model)
    out = _decode(graphdef, params, jnp.asarray(buffer), jax.random.key(seed), T0, float(temperature), top_k, top_p)
    return np.asarray(out)
