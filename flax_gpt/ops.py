"""The model's ops with hand-written backward passes (jax.custom_vjp), each beside the plain version it equals
and is tested against (autodiff_*: the formula, differentiated by JAX). What the backward pass keeps is chosen here:

    layer_norm         keeps its input and two statistics per row (autodiff: three float32 copies)
    gelu               GPT-2's tanh GELU keeping its input and tanh (autodiff: six (B, T, 4C) tensors)
    gelu_exact         nanoGPT's exact (erf) GELU keeping only its input
    causal_attention   XLA attention over blocks of queries, each block recomputed in the backward pass (with
                       dropout, each block's mask too: only the key is kept); CPU training takes
                       flax_gpt.tiled_attention instead
    matmul             a bf16 x bf16 -> f32 dot whose backward runs in bf16 too (low_precision_matmul)
    lm_head_loss       tied lm_head + cross entropy over chunks of tokens, logits never all in memory
                       (lm_head_loss_and_dx and add_lm_head_dw: its two gradients apart, for flax_gpt.remat)

`with ops.use_autodiff():` every op runs its autodiff_* version instead: the one switch, read when a function is
traced and part of jax.jit's cache key. Every backward pass starts with `after`: XLA:CPU schedules work that needs
only saved inputs (recomputation, converts, transposed copies, zeroed accumulators) as early as they exist, in the
forward pass, and keeps the results until the backward pass (optimization barriers do not stop it: XLA:CPU removes
them before it schedules). Blocks and chunks run in rolled loops (lax.map / lax.scan), so only one block's
temporaries exist at a time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

ATTENTION_BLOCK = 256  # queries per block of causal_attention
LOSS_CHUNK = 1024  # tokens per chunk of lm_head_loss: (LOSS_CHUNK, Vp) float32 logits at a time
FULL_LOGITS_TOKENS = 2048  # up to this many tokens lm_head_loss takes the full logits and plain autodiff

_AUTODIFF = jax.make_user_context(False)  # True within use_autodiff(); a value jax.jit's cache keys on


def use_autodiff(enabled: bool = True):
    """Context manager: within it, the ops below run their autodiff_* versions instead of their custom VJPs."""
    return _AUTODIFF(enabled)


def _custom() -> bool:
    """Whether the hand-written backward passes run: everywhere outside use_autodiff()."""
    return not _AUTODIFF.value


def _to_blocks(x, size: int):
    """(B, T, ...) -> (n, B, size, ...), T padded with zeros up to n * size."""
    B, T = x.shape[:2]
    n = -(-T // size)
    x = jnp.pad(x, [(0, 0), (0, n * size - T)] + [(0, 0)] * (x.ndim - 2))  # (B, n * size, ...)
    return x.reshape(B, n, size, *x.shape[2:]).swapaxes(0, 1)  # (n, B, size, ...)


def _from_blocks(x, T: int):
    """(n, B, size, ...) -> (B, T, ...): the inverse of _to_blocks."""
    n, B, size = x.shape[:3]
    return x.swapaxes(0, 1).reshape(B, n * size, *x.shape[3:])[:, :T]  # (B, T, ...)


def after(g, *xs):
    """xs, made to depend on g (0 * one element of g is added): nothing computed from them runs before g exists."""
    zero = g.reshape(-1)[0].astype(jnp.float32) * 0  # () float32
    return tuple(jax.tree.map(lambda x: x + zero.astype(x.dtype), x) for x in xs)


def _sum_and_stack(f, xs, zeros):
    """(zeros + sum over i of f(xs[i])[0], stack over i of f(xs[i])[1]): a rolled loop over the leading axis
    (straight code for a single element)."""
    def step(total, x):
        part, out = f(x)
        return jax.tree.map(jnp.add, total, part), out

    if jax.tree.leaves(xs)[0].shape[0] == 1:
        total, out = step(zeros, jax.tree.map(lambda a: a[0], xs))
        return total, jax.tree.map(lambda a: a[None], out)
    return jax.lax.scan(step, zeros, xs)


# ----------------------------------------------------------------------------- layer norm, GELU


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis in float32: x (..., C), scale and bias (C,) -> (..., C) float32."""
    return (_layer_norm if _custom() else autodiff_layer_norm)(x, scale, bias, eps)


def autodiff_layer_norm(x, scale, bias, eps: float):
    """layer_norm written out, for JAX autodiff: (..., C) -> (..., C) float32."""
    x = x.astype(jnp.float32)  # (..., C)
    mean = x.mean(-1, keepdims=True)  # (..., 1)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + bias  # (..., C)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps: float):
    """layer_norm keeping x in its own dtype and two float32 statistics per row for the backward pass."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_stats(x, eps: float):
    """Row mean and 1 / std of x (..., C), both (..., 1) float32 (two-pass variance, as torch)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)  # (..., 1)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)  # (..., 1)
    return mean, jax.lax.rsqrt(var + eps)


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)  # (..., C)
    mean, rstd = _layer_norm_stats(x32, eps)  # (..., 1) each
    y = (x32 - mean) * rstd * scale + bias  # (..., C)
    return y, (x, mean, rstd, scale)  # x in its own dtype: a bf16 input is kept in bf16


# Equals jax.vjp(autodiff_layer_norm, x, scale, bias, eps)[1](g) for the (dx, dscale, dbias).
def _layer_norm_bwd(eps, saved, g):
    x_in, mean, rstd, scale = after(g, *saved)
    x_hat = (x_in.astype(jnp.float32) - mean) * rstd  # (..., C)
    g_hat = g * scale  # (..., C)
    dx = rstd * (g_hat - jnp.mean(g_hat, axis=-1, keepdims=True)
                 - x_hat * jnp.mean(g_hat * x_hat, axis=-1, keepdims=True))  # (..., C)
    batch_axes = tuple(range(x_hat.ndim - 1))
    dscale, dbias = jnp.sum(g * x_hat, axis=batch_axes), jnp.sum(g, axis=batch_axes)  # (C,) each
    return dx.astype(x_in.dtype), dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


GELU_C = math.sqrt(2 / math.pi)


def gelu(x):
    """GPT-2's GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in x's dtype."""
    return (_gelu if _custom() else autodiff_gelu)(x)


def autodiff_gelu(x):
    """gelu written out, for JAX autodiff: (...) -> (...) in x's dtype."""
    return 0.5 * x * (1 + jnp.tanh(GELU_C * (x + 0.044715 * x**3)))  # (..., 4C)


@jax.custom_vjp
def _gelu(x):
    """gelu keeping x and its tanh for the backward pass."""
    return _gelu_fwd(x)[0]


def _gelu_fwd(x):
    t = jnp.tanh(GELU_C * (x + 0.044715 * x**3))  # (..., 4C) in x's dtype, as jax.nn.gelu computes it
    return x * (0.5 * (1.0 + t)), (x, t)


# Equals jax.vjp(autodiff_gelu, x)[1](g), the slope formed in float32.
def _gelu_bwd(saved, g):
    x, t = (a.astype(jnp.float32) for a in after(g, *saved))  # (..., 4C) each
    slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * x * x)  # (..., 4C)
    return ((g.astype(jnp.float32) * slope).astype(saved[0].dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def gelu_exact(x):
    """nanoGPT's (torch's nn.GELU()) exact GELU: 0.5 x (1 + erf(x / sqrt 2)), in x's dtype."""
    return (_gelu_exact if _custom() else autodiff_gelu_exact)(x)


def autodiff_gelu_exact(x):
    """gelu_exact written out as jax.nn.gelu(approximate=False) computes it, for JAX autodiff: (...) -> (...)."""
    return 0.5 * x * jax.lax.erfc(-x * jnp.asarray(SQRT_HALF, x.dtype))  # (..., 4C)


@jax.custom_vjp
def _gelu_exact(x):
    """gelu_exact keeping only x for the backward pass."""
    return autodiff_gelu_exact(x)


def _gelu_exact_fwd(x):
    return autodiff_gelu_exact(x), (x,)  # x in its own dtype


# Equals jax.vjp(autodiff_gelu_exact, x)[1](g), the slope Phi(x) + x phi(x) formed in float32.
def _gelu_exact_bwd(saved, g):
    (x,) = after(g, *saved)
    x32 = x.astype(jnp.float32)  # (..., 4C)
    slope = 0.5 * jax.lax.erfc(-x32 * SQRT_HALF) + x32 * INV_SQRT_2PI * jnp.exp(-0.5 * x32 * x32)  # (..., 4C)
    return ((g.astype(jnp.float32) * slope).astype(x.dtype),)


_gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


# ----------------------------------------------------------------------------- dropout, attention


def dropout(x, rate: float, key):
    """torch's dropout: each element of x zeroed with probability rate, the others scaled by 1 / (1 - rate); x itself
    when key is None. The backward pass keeps only the mask (a bool per element)."""
    if key is None or rate == 0:
        return x
    return jnp.where(keep_mask(key, rate, x.shape), x * (1 / (1 - rate)), 0).astype(x.dtype)  # x's shape and dtype


def site_key(key, site):
    """The key of one dropout site (or block, or part of the model) under key: fold_in(key, site); None for None."""
    return None if key is None else jax.random.fold_in(key, site)


def keep_mask(key, rate: float, shape):
    """The elements dropout keeps: True with probability 1 - rate."""
    return jax.random.bernoulli(key, 1.0 - rate, shape)


def attention_keep_mask(key, rate: float, shape):
    """The attention probabilities (B, nh, T, T) that causal_attention's dropout keeps: drawn by blocks of queries
    (block i from fold_in(key, i)), as the blocks are computed and recomputed."""
    B, nh, T, _ = shape
    size = _block_size(T)
    blocks = [keep_mask(site_key(key, i), rate, (B, nh, size, T)) for i in range(-(-T // size))]
    return jnp.concatenate(blocks, axis=2)[:, :, :T]  # (B, nh, T, T)


def causal_attention(q, k, v, dropout_rate: float = 0.0, key=None):
    """Causal self-attention (B, T, nh, hs) -> (B, T, nh, hs); past ATTENTION_BLOCK queries by blocks recomputed in
    the backward pass, as flash attention does, instead of keeping (B, nh, T, T) scores for every layer. With a key,
    dropout on the attention probabilities (nanoGPT's attn_dropout): always by blocks, the masks recomputed too; so
    is float16 (see masked_attention)."""
    if _one_xla_call(q, key, dropout_rate):
        if q.shape[1] <= ATTENTION_BLOCK or not _custom():
            return autodiff_causal_attention(q, k, v)  # (B, T, nh, hs)
        return _blocked_attention(q, k, v, None, 0.0)  # (B, T, nh, hs)
    if not _custom():
        return autodiff_causal_attention(q, k, v, dropout_rate, key)  # (B, T, nh, hs)
    return _blocked_attention(q, k, v, key, dropout_rate)  # (B, T, nh, hs)


def autodiff_causal_attention(q, k, v, dropout_rate: float = 0.0, key=None):
    """causal_attention for JAX autodiff: one XLA jax.nn.dot_product_attention call, or with dropout the blocks'
    forward pass: (B, T, nh, hs) -> (B, T, nh, hs)."""
    if _one_xla_call(q, key, dropout_rate):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")  # (B, T, nh, hs)
    return _blocked_forward(q, k, v, key, dropout_rate)  # (B, T, nh, hs)


def _one_xla_call(q, key, rate: float) -> bool:
    """Whether jax.nn.dot_product_attention computes this attention: no dropout, not float16 (masked_attention)."""
    return (key is None or rate == 0) and q.dtype != jnp.float16


def masked_attention(q, k, v, visible, key=None, rate: float = 0.0):
    """Queries q (B, Tq, nh, hs) attend to the keys k, v (B, T, nh, hs) that visible (Tq, T) allows: XLA's
    jax.nn.dot_product_attention, or, with a dropout key or in float16 (whose F16_F16_F32 dot XLA:CPU refuses), the
    same computation written out, the probabilities through dropout."""
    if key is None and q.dtype != jnp.float16:
        return jax.nn.dot_product_attention(q, k, v, mask=visible[None, None], implementation="xla")  # (B, Tq, nh, hs)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # (B, nh, Tq, T)
    scores = scores * (1 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, T)
    scores = jnp.where(visible[None, None], scores, jnp.finfo(jnp.float32).min / 2)  # as jax.nn's large negative
    probs = dropout(jax.nn.softmax(scores, axis=-1), rate, key).astype(v.dtype)  # (B, nh, Tq, T)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)  # (B, Tq, nh, hs)


def _attend_rows(q, k, v, start, key=None, rate: float = 0.0):
    """Queries q (B, Tq, nh, hs) at positions start.. attend to keys k, v (B, T, nh, hs) at or before them; with a key,
    the probabilities go through dropout."""
    (start,) = after(q, start)  # else JAX's remat saves this mask, broadcast to (n, B, nh, Tq, T), as a residual
    visible = jnp.arange(k.shape[1])[None, :] <= start + jnp.arange(q.shape[1])[:, None]  # (Tq, T)
    return masked_attention(q, k, v, visible, key, rate)  # (B, Tq, nh, hs)


def _query_blocks(q):
    """(blocks of q (n, B, size, nh, hs), their first positions (n,)): size ATTENTION_BLOCK, or T when shorter."""
    size = _block_size(q.shape[1])
    return _to_blocks(q, size), jnp.arange(0, q.shape[1], size)


def _block_size(T: int) -> int:
    """Queries per block of causal_attention's blocked path: ATTENTION_BLOCK, or T when shorter."""
    return min(T, ATTENTION_BLOCK)


def _blocked_forward(q, k, v, key, rate: float):
    """causal_attention by blocks of queries, each block's dropout mask from its own key: (B, T, nh, hs)."""
    q_blocks, starts = _query_blocks(q)  # (n, B, size, nh, hs), (n,)
    size = q_blocks.shape[2]
    out = jax.lax.map(lambda qs: _attend_rows(qs[0], k, v, qs[1], site_key(key, qs[1] // size), rate),
                      (q_blocks, starts))  # (n, B, size, nh, hs)
    return _from_blocks(out, q.shape[1])  # (B, T, nh, hs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_attention(q, k, v, key, rate: float):
    """causal_attention by blocks of queries, keeping only q, k, v (and the dropout key) for the backward pass."""
    return _blocked_forward(q, k, v, key, rate)


def _blocked_attention_fwd(q, k, v, key, rate):
    return _blocked_forward(q, k, v, key, rate), (q, k, v, key)


# Equals jax.vjp(autodiff_causal_attention, q, k, v)[1](g), one block of queries' scores (and dropout mask)
# recomputed at a time.
def _blocked_attention_bwd(rate, saved, g):
    q, k, v = after(g, *saved[:3])
    key = saved[3]

    def block_grads(qgs):
        q_i, g_i, start = qgs  # (B, Tq, nh, hs), (B, Tq, nh, hs), ()
        block_key = site_key(key, start // q_i.shape[1])
        _, block_vjp = jax.vjp(lambda q_i, k, v: _attend_rows(q_i, k, v, start, block_key, rate), q_i, k, v)
        dq_i, dk, dv = block_vjp(g_i)  # (B, Tq, nh, hs), (B, T, nh, hs), (B, T, nh, hs)
        return (dk.astype(jnp.float32), dv.astype(jnp.float32)), dq_i

    q_blocks, starts = _query_blocks(q)  # (n, B, size, nh, hs), (n,)
    zeros = after(g, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))  # (B, T, nh, hs) each
    (dk, dv), dq = _sum_and_stack(block_grads, (q_blocks, _to_blocks(g, q_blocks.shape[2]), starts),
                                  zeros)  # (B, T, nh, hs) float32 each, (n, B, Tq, nh, hs)
    return _from_blocks(dq, q.shape[1]), dk.astype(k.dtype), dv.astype(v.dtype), None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


# ----------------------------------------------------------------------------- matmul


def matmul(x, w, dtype: str, output: str = "float32"):
    """x (..., K) @ w (K, N) in the compute dtype, result (..., N) float32; output="compute" (GPTConfig.matmul_output):
    a 16-bit dot returns the compute dtype, cast after (backends that ignore preferred_element_type)."""
    x = x.astype(dtype)
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.dot(x, w.astype(dtype))  # (..., N)
    if output == "compute":
        return jnp.dot(x, w.astype(dtype)).astype(jnp.float32)  # (..., N); autodiff's backward dots in 16 bits too
    return (low_precision_matmul if _custom() else autodiff_low_precision_matmul)(x, w)  # (..., N)


def autodiff_low_precision_matmul(x, w):
    """low_precision_matmul for JAX autodiff: the float32 output's cotangent makes both backward dots float32."""
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)  # (..., N)


@jax.custom_vjp
def low_precision_matmul(x, w):
    """x (..., K) in a 16-bit dtype @ w (K, N) rounded to it -> (..., N) float32; backward dots in that dtype too, as
    under torch autocast. It keeps w as given (the float32 parameter, alive anyway), not a bf16 copy."""
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)  # (..., N)


def _low_precision_matmul_fwd(x, w):
    return low_precision_matmul(x, w), (x, w)


# Equals jax.vjp(autodiff_low_precision_matmul, x, w)[1](g) with g first rounded to x's dtype (exact in float32).
def _low_precision_matmul_bwd(saved, g):
    x, w = after(g, *saved)
    g = g.astype(x.dtype)  # (..., N)
    dx = jnp.dot(g, w.astype(x.dtype).T, preferred_element_type=jnp.float32)  # (..., K)
    batch_axes = tuple(range(x.ndim - 1))
    dw = jnp.tensordot(x, g, axes=(batch_axes, batch_axes), preferred_element_type=jnp.float32)  # (K, N)
    return dx.astype(x.dtype), dw.astype(w.dtype)


low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


# ----------------------------------------------------------------------------- lm_head + loss


def _dot(a, b, contract: tuple[int, int], matmul_output: str):
    """a . b over one axis each, float32 out: accumulated in float32, or (matmul_output "compute") cast after."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    if matmul_output == "compute":
        return jax.lax.dot_general(a, b, dims).astype(jnp.float32)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _chunk_logits(x, w, vocab_size: int, matmul_output: str):
    """Logits (N, Vp) float32 of x (N, C) against w (Vp, C), both in the compute dtype; -inf past vocab_size."""
    logits = _dot(x, w, (1, 1), matmul_output)  # (N, Vp)
    if w.shape[0] > vocab_size:
        logits = logits + jnp.where(jnp.arange(w.shape[0]) < vocab_size, 0.0, -jnp.inf)  # (Vp,) broadcast
    return logits


def tied_logits(x, wte, vocab_size: int, dtype: str, matmul_output: str = "float32"):
    """Logits over all Vp rows of the tied wte (Vp, C): x (..., C) -> (..., Vp) float32, -inf past vocab_size (the
    padding drops out of every softmax exactly)."""
    # wte rounded to the compute dtype before it is transposed: XLA:CPU has no bf16 kernel for a dot that does both
    logits = matmul(x, wte.astype(dtype).T, dtype, matmul_output)  # (..., Vp)
    if wte.shape[0] > vocab_size:
        logits = logits + jnp.where(jnp.arange(wte.shape[0]) < vocab_size, 0.0, -jnp.inf)  # (Vp,) broadcast
    return logits


def token_cross_entropy(logits, targets):
    """Cross entropy of each token in float32: logits (B, T, V or Vp), targets (B, T) -> (B, T); logsumexp minus
    the target's logit, without writing out the log-probabilities (BENCHMARKS.md)."""
    logits = logits.astype(jnp.float32)  # (B, T, V)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # (B, T)
    return jax.nn.logsumexp(logits, axis=-1) - picked  # (B, T)


def cross_entropy(logits, targets):
    """Mean next-token cross entropy in float32: logits (B, T, V or Vp), targets (B, T)."""
    return token_cross_entropy(logits, targets).mean()


def loss_in_chunks(n_tokens: int) -> bool:
    """Whether lm_head_loss takes n_tokens chunk by chunk: more than FULL_LOGITS_TOKENS, outside use_autodiff()."""
    return n_tokens > FULL_LOGITS_TOKENS and _custom()


def lm_head_loss(x, wte, targets, vocab_size: int, dtype: str, matmul_output: str = "float32", grad_scale=None):
    """Mean cross entropy of the logits x @ wte.T (x (B, T, C), wte (Vp, C)) against targets (B, T): up to
    FULL_LOGITS_TOKENS tokens the full logits (on CPU a small step ran 1.20x slower in chunks), beyond chunk by chunk.
    grad_scale: the cotangent the gradient will be taken with (float16's loss scale): the chunks' gradients, formed
    in the forward pass, are scaled by it before they are rounded to the compute dtype (else they flush to zero)."""
    if not loss_in_chunks(x.shape[0] * x.shape[1]):
        return autodiff_lm_head_loss(x, wte, targets, vocab_size, dtype, matmul_output)
    return _chunked_lm_head_loss(x, wte, targets, grad_scale, vocab_size, dtype, matmul_output)


def autodiff_lm_head_loss(x, wte, targets, vocab_size: int, dtype: str, matmul_output: str = "float32"):
    """lm_head_loss from the full (B, T, Vp) logits, for JAX autodiff."""
    return cross_entropy(tied_logits(x, wte, vocab_size, dtype, matmul_output), targets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_lm_head_loss(x, wte, targets, grad_scale, vocab_size: int, dtype: str, matmul_output: str = "float32"):
    """lm_head_loss by LOSS_CHUNK tokens; under autodiff its forward pass forms the gradients too, chunk by chunk
    (the loss is the last op: its cotangent only scales them), so no matmul is recomputed."""
    return _lm_head_loss(x, wte, targets, vocab_size, dtype, matmul_output)[0]


def _lm_head_loss(x, wte, targets, vocab_size: int, dtype: str, matmul_output: str, with_dx: bool = False,
                  dw_total=None, grad_scale=None):
    """(mean loss, dx (B, T, C) or None, dw_total + dwte (Vp, C) or None), LOSS_CHUNK tokens at a time: dx with
    with_dx, the weight gradient (added to dw_total) when dw_total is given; both times grad_scale if given."""
    B, T, C = x.shape
    n = B * T
    w = wte.astype(dtype)  # (Vp, C)
    size = min(LOSS_CHUNK, n)
    x_chunks = _to_blocks(x.reshape(1, n, C).astype(dtype), size)[:, 0]  # (n_chunks, size, C)
    t_chunks = _to_blocks(targets.reshape(1, n).astype(jnp.int32) + 1, size)[:, 0] - 1  # (n_chunks, size), padding -1
    with_dw = dw_total is not None

    def chunk(xt):
        x_i, t_i = xt  # (N_i, C), (N_i,)
        logits = _chunk_logits(x_i, w, vocab_size, matmul_output)  # (N_i, Vp) float32
        lse = jax.nn.logsumexp(logits, axis=-1)  # (N_i,)
        picked = jnp.take_along_axis(logits, jnp.maximum(t_i, 0)[:, None], axis=-1)[:, 0]  # (N_i,)
        real = t_i >= 0  # (N_i,) False on the padding
        loss_sum = jnp.sum(jnp.where(real, lse - picked, 0.0))
        if not (with_dx or with_dw):
            return (loss_sum, None), None
        is_target = jnp.arange(logits.shape[1])[None, :] == t_i[:, None]  # (N_i, Vp)
        probs = jnp.where(real[:, None], jnp.exp(logits - lse[:, None]), 0.0)  # (N_i, Vp)
        d = (probs - is_target) / n if grad_scale is None else (probs - is_target) * (grad_scale / n)  # (N_i, Vp)
        dlogits = d.astype(dtype)  # (N_i, Vp)
        dx_i = _dot(dlogits, w, (1, 0), matmul_output) if with_dx else None  # (N_i, C)
        dw = _dot(dlogits, x_i, (0, 0), matmul_output) if with_dw else None  # (Vp, C)
        return (loss_sum, dw), dx_i

    zeros = (jnp.zeros((), jnp.float32), dw_total.astype(jnp.float32) if with_dw else None)
    (loss_sum, dw), dx = _sum_and_stack(chunk, (x_chunks, t_chunks), zeros)  # (), (Vp, C), (n_chunks, size, C)
    if with_dx:
        dx = _from_blocks(dx[:, None], n)[0].reshape(B, T, C).astype(x.dtype)  # (B, T, C)
    return loss_sum / n, dx, None if dw is None else dw.astype(wte.dtype)


def lm_head_loss_and_dx(x, wte, targets, vocab_size: int, dtype: str, matmul_output: str = "float32",
                        grad_scale=None):
    """(mean loss, its gradient (B, T, C) with respect to x, times grad_scale if given) of lm_head_loss, chunk by
    chunk, without the weight gradient: add_lm_head_dw forms that later (flax_gpt.remat, after the blocks')."""
    return _lm_head_loss(x, wte, targets, vocab_size, dtype, matmul_output, with_dx=True, grad_scale=grad_scale)[:2]


def add_lm_head_dw(dw_total, x, wte, targets, vocab_size: int, dtype: str, matmul_output: str = "float32",
                   grad_scale=None):
    """dw_total (Vp, C) plus the gradient of lm_head_loss with respect to wte (times grad_scale if given), its
    logits recomputed chunk by chunk and each chunk's gradient added in place."""
    return _lm_head_loss(x, wte, targets, vocab_size, dtype, matmul_output, dw_total=dw_total, grad_scale=grad_scale)[2]


def _lm_head_loss_fwd(x, wte, targets, grad_scale, vocab_size, dtype, matmul_output):
    loss, dx, dw = _lm_head_loss(x, wte, targets, vocab_size, dtype, matmul_output, with_dx=True,
                                 dw_total=jnp.zeros(wte.shape, jnp.float32), grad_scale=grad_scale)
    return loss, (dx, dw, targets, grad_scale)  # dx (B, T, C), dw (Vp, C), both times grad_scale if given


# Equals jax.vjp(autodiff_lm_head_loss, x, wte, targets, ...)[1](g) for (dx, dwte), from gradients formed forward
# (formed times grad_scale, so g / grad_scale is 1 when g is that scale).
def _lm_head_loss_bwd(vocab_size, dtype, matmul_output, saved, g):
    dx, dw, targets, grad_scale = saved
    if grad_scale is not None:
        g = g / grad_scale
    return g * dx, g * dw, None, None


_chunked_lm_head_loss.defvjp(_lm_head_loss_fwd, _lm_head_loss_bwd)
