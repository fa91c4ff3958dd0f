"""Muon as torch.optim.Muon computes it: Nesterov momentum, orthogonalized by a Newton-Schulz iteration in bf16.

torch.optim.Muon(lr, weight_decay, momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.775, 2.0315),
eps=1e-7, ns_steps=5, adjust_lr_fn=None) for each 2-D weight W:
    buf = buf.lerp(grad, 1 - momentum);  u = grad.lerp(buf, momentum)     (nesterov; else u = buf)
    W = W * (1 - lr * weight_decay) - lr * sqrt(max(1, out / in)) * NewtonSchulz(u)
optax.contrib.muon differs in three places, so it is not used: its Nesterov step is bias-corrected (the momentum
term weighs half as much at step 1), it iterates in the gradient's dtype (torch in bf16), and it adds eps to the norm
(torch clamps). Flax kernels are (in, out), torch weights (out, in): the lr ratio reads the shape accordingly, and
leading axes (the stacked layers) are separate matrices.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults (KellerJordan/Muon)
NS_STEPS = 5
NS_EPS = 1e-7  # torch clamps the norm at eps before dividing


def _round(x, dtype):
    """x (float32) rounded to dtype, also under jit: XLA may drop a bf16 rounding as excess precision, never a
    reduce_precision (on the CPU it kept x / norm in float32: the jitted iteration 1.2e-2 to 1.9e-2 from torch's)."""
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant).astype(dtype)


def _dot(equation: str, a, b):
    """einsum of two bf16 matrices, accumulated and returned in float32 (the fast dot form on every backend)."""
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def newton_schulz(g, transposed: bool | None = None, steps: int = NS_STEPS, coefficients=NS_COEFFICIENTS,
                  eps: float = NS_EPS, dtype=jnp.bfloat16):
    """torch's _zeropower_via_newtonschulz of one (m, n) matrix, its iterates rounded to `dtype` as its bf16 matmuls
    and addmms round them (float32 accumulation, one rounding per op). It iterates X = g, or X = g^T where
    `transposed` (default: g tall, as torch), the latter written on g itself: no transpose is materialized, which
    XLA:CPU would turn into float32 dots (the update of gpt2's matrices 25% slower)."""
    a, b, c = coefficients
    transposed = g.shape[0] > g.shape[1] if transposed is None else transposed
    gram_of, times_x = ("ki,kj->ij", "kj,ij->ki") if transposed else ("ik,jk->ij", "ij,jk->ik")  # X X^T; G' X
    x = g.astype(dtype)  # (m, n)
    norm = _round(jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))), dtype)
    x = _round(x.astype(jnp.float32) / jnp.maximum(norm, jnp.asarray(eps, dtype)).astype(jnp.float32), dtype)
    for _ in range(steps):  # Frobenius norm 1 above: spectral norm at most 1
        gram = _round(_dot(gram_of, x, x), dtype)  # (k, k), k = min(m, n)
        gram_update = _round(b * gram.astype(jnp.float32) + c * _dot("ij,jk->ik", gram, gram), dtype)  # addmm(G, G, G)
        step = _dot(times_x, x, gram_update) if transposed else _dot(times_x, gram_update, x)  # (m, n)
        x = _round(a * x.astype(jnp.float32) + step, dtype)  # addmm(X, G', X, beta=a)
    return x


def lr_ratio(kernel_shape) -> float:
    """torch's adjust_lr_fn=None ("original"): sqrt(max(1, out / in)) of a (..., in, out) kernel."""
    fan_in, fan_out = kernel_shape[-2:]
    return max(1.0, fan_out / fan_in) ** 0.5


class ScaleByMuonState(NamedTuple):
    momentum: optax.Updates  # torch's momentum_buffer, one per matrix, float32


def scale_by_muon(momentum: float = 0.95, nesterov: bool = True, ns_dtype=jnp.bfloat16,
                  split_qkv: bool = False) -> optax.GradientTransformation:
    """The Muon direction lr_ratio * NewtonSchulz(nesterov momentum) of each (..., in, out) kernel; with split_qkv
    the attention's fused c_attn (in, 3C) is orthogonalized as three (in, C) matrices q, k and v."""
    keep = 1 - jnp.float32(momentum)  # torch's grad.lerp(buf, momentum) forms 1 - weight in float32
    take = jnp.float32(1 - momentum)  # buf.lerp_(grad, 1 - momentum): the weight itself

    # torch iterates its (out, in) weight, the kernel's transpose, unless that is tall: the kernel's transpose here
    # unless the kernel is wide (square ones transposed too, as torch)
    ns = _batched(lambda k: newton_schulz(k, transposed=k.shape[0] >= k.shape[1], dtype=ns_dtype))

    def orthogonalize(path, u):
        lead = u.shape[:-2]
        if split_qkv and any(getattr(k, "key", None) == "c_attn" for k in path):
            fan_in, three_c = u.shape[-2:]
            parts = jnp.moveaxis(u.reshape(*lead, fan_in, 3, three_c // 3), -2, 0)  # (3, ..., in, C)
            o = jnp.moveaxis(ns(parts), 0, -2).reshape(u.shape)  # (..., in, 3C)
            return lr_ratio((fan_in, three_c // 3)) * o.astype(u.dtype)
        return lr_ratio(u.shape) * ns(u).astype(u.dtype)  # (..., in, out)

    def init_fn(params):
        return ScaleByMuonState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        buf = jax.tree.map(lambda m, g: m + take * (g - m), state.momentum, updates)
        direction = jax.tree.map(lambda m, g: m - (m - g) * keep, buf, updates) if nesterov else buf
        return jax.tree_util.tree_map_with_path(orthogonalize, direction), ScaleByMuonState(momentum=buf)

    return optax.GradientTransformation(init_fn, update_fn)


def _batched(fn):
    """fn of one matrix applied over every leading axis of a (..., m, n) array."""
    def apply(x):
        return fn(x) if x.ndim == 2 else jax.vmap(apply)(x)
    return apply


def muon(learning_rate, momentum: float = 0.95, weight_decay: float = 0.1, nesterov: bool = True,
         ns_dtype=jnp.bfloat16, split_qkv: bool = False) -> optax.GradientTransformation:
    """W <- W - lr * (lr_ratio * NewtonSchulz(u) + weight_decay * W), torch.optim.Muon's step; learning_rate may be
    a schedule (its count advances through a skipped float16 step, as AdamW's does)."""
    return optax.chain(scale_by_muon(momentum, nesterov, ns_dtype, split_qkv),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))
