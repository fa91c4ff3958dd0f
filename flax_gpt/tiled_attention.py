"""Causal attention for CPUs (GPTConfig.attention "tiled"): queries by tiles of TILE, each tile against only the keys
at or before its last query, so most of the masked half of the (T, T) scores is never computed, as torch's CPU
flash attention skips it. Heads lead the layout, (B, nh, T, hs): batched dots XLA:CPU sends to its YNNPACK kernels
(BENCHMARKS.md). The backward pass keeps q, k, v, the output and one log-sum-exp per query, and recomputes each
tile's probabilities (flash attention's backward).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flax_gpt.ops import _custom, after

TILE = 64  # queries per tile, at least; 32 and 128 measured slower in fp32 at T=256 (BENCHMARKS.md)
MAX_TILES = 4  # past 4 * TILE queries the tiles grow instead: compile time grows with their number
F32 = jnp.float32


def tiled_causal_attention(q, k, v):
    """Causal self-attention (B, T, nh, hs) -> (B, T, nh, hs) in float32 or bfloat16, without dropout."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, nh, T, hs) each
    y = (_tiled if _custom() else autodiff_tiled_attention)(q, k, v)  # (B, nh, T, hs)
    return jnp.swapaxes(y, 1, 2)  # (B, T, nh, hs)


def _tiles(T: int):
    """(start, end) of each tile of queries: TILE queries each, or T / MAX_TILES rounded up to a multiple of TILE."""
    size = max(TILE, -(-T // (MAX_TILES * TILE)) * TILE)
    return [(start, min(start + size, T)) for start in range(0, T, size)]


def _scores(q_i, k_i, start: int):
    """Scaled scores (B, nh, S, L) float32 of the queries q_i (B, nh, S, hs) at positions start.. against the keys
    k_i (B, nh, L, hs) at 0..L-1, the future ones at jax.nn's large negative."""
    S, L = q_i.shape[2], k_i.shape[2]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_i, preferred_element_type=F32) * (1 / math.sqrt(q_i.shape[-1]))
    visible = jnp.arange(L)[None, :] <= start + jnp.arange(S)[:, None]  # (S, L)
    return jnp.where(visible, scores, jnp.finfo(F32).min / 2)  # (B, nh, S, L)


def _forward(q, k, v):
    """(output (B, nh, T, hs), log-sum-exp of each query's scores (B, nh, T) float32)."""
    outs, lses = [], []
    for start, end in _tiles(q.shape[2]):
        scores = _scores(q[:, :, start:end], k[:, :, :end], start)  # (B, nh, S, end)
        lse = jax.nn.logsumexp(scores, axis=-1)  # (B, nh, S)
        probs = jnp.exp(scores - lse[..., None]).astype(v.dtype)  # (B, nh, S, end)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v[:, :, :end], preferred_element_type=F32)  # (B, nh, S, hs)
        outs.append(out.astype(v.dtype))
        lses.append(lse)
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)  # (B, nh, T, hs), (B, nh, T)


def autodiff_tiled_attention(q, k, v):
    """The tiled attention of q, k, v (B, nh, T, hs) for JAX autodiff: (B, nh, T, hs)."""
    return _forward(q, k, v)[0]


@jax.custom_vjp
def _tiled(q, k, v):
    return _forward(q, k, v)[0]


def _tiled_fwd(q, k, v):
    y, lse = _forward(q, k, v)
    return y, (q, k, v, y, lse)


# Equals jax.vjp(autodiff_tiled_attention, q, k, v)[1](g) up to rounding, each tile's probabilities recomputed.
def _tiled_bwd(saved, g):
    q, k, v, y, lse = after(g, *saved)
    dtype, scale = v.dtype, 1 / math.sqrt(q.shape[-1])
    delta = jnp.sum(g.astype(F32) * y.astype(F32), axis=-1)  # (B, nh, T): each row's sum of probs * dprobs
    dq, dk, dv = [], jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32)  # dk, dv (B, nh, T, hs)
    for start, end in _tiles(q.shape[2]):
        q_i, g_i = q[:, :, start:end], g[:, :, start:end]  # (B, nh, S, hs) each
        probs = jnp.exp(_scores(q_i, k[:, :, :end], start) - lse[:, :, start:end, None])  # (B, nh, S, end)
        dv = dv.at[:, :, :end].add(jnp.einsum("bhqk,bhqd->bhkd", probs.astype(dtype), g_i,
                                              preferred_element_type=F32))  # (B, nh, end, hs)
        dprobs = jnp.einsum("bhqd,bhkd->bhqk", g_i, v[:, :, :end], preferred_element_type=F32)  # (B, nh, S, end)
        dscores = probs * (dprobs - delta[:, :, start:end, None]) * scale  # (B, nh, S, end)
        dq.append(jnp.einsum("bhqk,bhkd->bhqd", dscores.astype(dtype), k[:, :, :end],
                             preferred_element_type=F32))  # (B, nh, S, hs)
        dk = dk.at[:, :, :end].add(jnp.einsum("bhqk,bhqd->bhkd", dscores.astype(dtype), q_i,
                                              preferred_element_type=F32))  # (B, nh, end, hs)
    return jnp.concatenate(dq, axis=2).astype(dtype), dk.astype(dtype), dv.astype(dtype)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
