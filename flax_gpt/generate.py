"""Sampling from a GPT with a KV cache: prefill the prompt, then one-token decode steps.

All shapes are fixed: the prompt is right-padded to a bucket (a multiple of 64, at most the
context) and the cache holds bucket + max_new_tokens positions, so a (batch, bucket,
max_new_tokens) compiles once and never per token. Padding is harmless: a decode step at
position p overwrites cache slot p before reading it, and attends to slots <= p only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_gpt.errors import UserError
from flax_gpt.model import GPT

PROMPT_BUCKET = 64


def filter_logits(logits, temperature: float, top_k: int | None, top_p: float | None):
    """Scale by temperature and mask (to -inf) what top-k / top-p exclude: logits (B, V)."""
    logits = logits / temperature  # (B, V)
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V) descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)  # (B, V)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # (B, V) probability of the higher-ranked tokens
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # (B, 1) smallest set reaching top_p
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)  # (B, 1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _pick(logits, key, temperature: float, top_k, top_p):
    """Next token ids (B,) from last-position logits (B, V): argmax when temperature is 0."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef, params, prompt, prompt_len, key, max_new_tokens: int, temperature: float, top_k, top_p):
    """prompt (B, P) right-padded, prompt_len real tokens -> new tokens (B, max_new_tokens)."""
    B, P = prompt.shape
    model = nnx.merge(graphdef, params)
    cache = model.init_kv_cache(B, P + max_new_tokens)
    logits, cache = model.decode(prompt, cache, 0)  # (B, P, V) prefill
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)  # (B, V)
    first = _pick(last, jax.random.fold_in(key, 0), temperature, top_k, top_p)  # (B,)

    def step(carry, i):
        token, cache = carry
        logits, cache = nnx.merge(graphdef, params).decode(token[:, None], cache, prompt_len + i)  # (B, 1, V)
        nxt = _pick(logits[:, 0], jax.random.fold_in(key, i + 1), temperature, top_k, top_p)  # (B,)
        return (nxt, cache), token

    (final, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(max_new_tokens - 1))  # tokens (N-1, B)
    return jnp.concatenate([tokens.T, final[:, None]], axis=1)  # (B, max_new_tokens)


def generate(model: GPT, idx, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> np.ndarray:
    """Continue prompts idx (B, T0) by max_new_tokens tokens; returns (B, T0 + max_new_tokens) ids."""
    idx = np.asarray(idx, np.int32)
    B, T0 = idx.shape
    block = model.config.block_size
    if T0 < 1:
        raise UserError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if T0 + max_new_tokens > block:
        raise UserError(f"prompt ({T0} tokens) + {max_new_tokens} new tokens = {T0 + max_new_tokens} exceeds the "
                        f"model's context of {block}; shorten the prompt or --max-new-tokens")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise UserError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    bucket = min(-(-T0 // PROMPT_BUCKET) * PROMPT_BUCKET, block)
    prompt = np.zeros((B, bucket), np.int32)  # (B, P) right-padded
    prompt[:, :T0] = idx
    graphdef, params = nnx.split(model)
    new = _generate(graphdef, params, jnp.asarray(prompt), jnp.int32(T0), jax.random.key(seed),
                    max_new_tokens, float(temperature), top_k, top_p)
    return np.concatenate([idx, np.asarray(new)], axis=1)
