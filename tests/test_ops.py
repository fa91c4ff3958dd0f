"""ops.use_autodiff(), the one switch from the six hand-written backward passes to their autodiff_* versions:
each op under it is its autodiff version, the model then has no custom VJP left, and its gradients agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_gpt import ops, preset, train_step
from flax_gpt.model import GPT

V, T = 100, 45  # T=45 past the small blocks below: several attention blocks and loss chunks, the last ones padded


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 queries, chunks of 16 tokens (the full logits up to 16 tokens), read when a function is traced."""
    for name, value in (("ATTENTION_BLOCK", 8), ("LOSS_CHUNK", 16), ("FULL_LOGITS_TOKENS", 16)):
        monkeypatch.setattr(ops, name, value)


def normal(*shapes, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


TARGETS = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, T)), jnp.int32)  # (2, T)
# op: (the model's op, its autodiff version, float32 args, bound on their gradients' difference without the switch);
# measured 4.8e-8 to 2.7e-7 in float32
CASES = {
    "layer_norm": (lambda x, s, b: ops.layer_norm(x, s, b, 1e-5),
                   lambda x, s, b: ops.autodiff_layer_norm(x, s, b, 1e-5),
                   [3 * x for x in normal((2, 5, 32))] + normal((32,), (32,), seed=1), 1e-5),
    "gelu": (ops.gelu, ops.autodiff_gelu, [3 * x for x in normal((2, 5, 32))], 1e-5),
    "gelu_exact": (ops.gelu_exact, ops.autodiff_gelu_exact, [3 * x for x in normal((2, 5, 32))], 1e-5),
    "causal_attention": (ops.causal_attention, ops.autodiff_causal_attention, normal(*[(2, T, 3, 16)] * 3), 1e-5),
    # the custom VJP rounds the cotangent to bf16, autodiff keeps it float32: measured 2.4e-3, bf16's 2e-2 bound
    "matmul": (lambda x, w: ops.matmul(x, w, "bfloat16"),
               lambda x, w: ops.autodiff_low_precision_matmul(x.astype(jnp.bfloat16), w), normal((2, 5, 32), (32, 24)),
               2e-2),
    "lm_head_loss": (lambda x, w: ops.lm_head_loss(x, w, TARGETS, V, "float32"),
                     lambda x, w: ops.autodiff_lm_head_loss(x, w, TARGETS, V, "float32"), normal((2, T, 16), (128, 16)),
                     1e-5),
}


def output_and_grads(f, args, g):
    """(f(*args), the gradients of args for the output's cotangent g), compiled as one program."""
    def run(*args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(g)

    return jax.jit(run)(*args)


@pytest.mark.parametrize("op", CASES)
def test_each_op_under_the_switch_is_its_autodiff_version(small_blocks, op):
    ours, autodiff, args, bound = CASES[op]
    out = jax.eval_shape(ours, *args)
    g = normal(out.shape, seed=3)[0].astype(out.dtype)
    ref_out, ref_grads = output_and_grads(autodiff, args, g)
    assert "custom_vjp_call" in str(jax.make_jaxpr(ours)(*args))  # without the switch: the hand-written backward
    _, grads = output_and_grads(ours, args, g)
    worst = max(rel(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in zip(grads, ref_grads))
    assert worst <= bound, worst
    with ops.use_autodiff():
        assert "custom_vjp_call" not in str(jax.make_jaxpr(ours)(*args))
        out, grads = output_and_grads(ours, args, g)
    np.testing.assert_array_equal(out, ref_out)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype, custom_vjps", [("float32", 6), ("bfloat16", 10)])
def test_the_switch_leaves_the_model_no_custom_vjp(small_blocks, dtype, custom_vjps):
    """Per block two layer norms, attention and GELU (and four matmuls in bf16); ln_f; the loss in chunks."""
    graphdef, params = nnx.split(GPT(preset("tiny", dtype=dtype), seed=0), nnx.Param)
    x, y = TARGETS, jnp.roll(TARGETS, -1, axis=1)  # (2, T) token ids each

    def count():
        jaxpr = jax.make_jaxpr(train_step.loss_fn, static_argnums=1)(params, graphdef, x, y)
        return str(jaxpr).count("custom_vjp_call")

    assert count() == custom_vjps
    with ops.use_autodiff():
        assert count() == 0


def test_model_gradients_agree_with_and_without_the_switch_and_a_jitted_step_is_traced_again(small_blocks):
    graphdef, params = nnx.split(GPT(preset("tiny"), seed=0), nnx.Param)
    x, y = TARGETS, jnp.roll(TARGETS, -1, axis=1)  # (2, T) token ids each
    step = jax.jit(jax.value_and_grad(train_step.loss_fn), static_argnums=1)
    loss, grads = step(params, graphdef, x, y)
    with ops.use_autodiff():
        ref_loss, ref_grads = step(params, graphdef, x, y)
    assert step._cache_size() == 2  # the switch is part of jax.jit's cache key
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * float(ref_loss)
    worst = max(rel(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert 0 < worst <= 1e-5, worst  # measured 5.8e-7 (fp32); not 0: really two programs


def exact_gelu_reference(x):
    return jax.nn.gelu(x, approximate=False)


# gelu_exact's gradient against float32 autodiff of jax.nn.gelu(approximate=False): (bound, floor) by input dtype
GELU_EXACT_GRAD = {"float32": (1e-6, 0.0),  # measured 5.6e-8
                   "bfloat16": (2e-2, 3e-4)}  # measured 1.5e-3: dx rounded to bf16 shows


@pytest.mark.parametrize("dtype", GELU_EXACT_GRAD)
def test_gelu_exact_is_jax_nn_gelu_exact(dtype):
    """Both versions of ops.gelu_exact give jax.nn.gelu(approximate=False)'s values in x's dtype; the custom VJP's
    gradient (slope in float32, cast to x's dtype) is float32 autodiff's of jax's formula."""
    x, g = (3 * a for a in normal((2, 5, 32), (2, 5, 32)))  # (2, 5, 32) float32 each
    x_in, g_in = x.astype(dtype), g.astype(dtype)
    ref = exact_gelu_reference(x_in)
    for f in (ops.gelu_exact, ops.autodiff_gelu_exact):
        out = f(x_in)
        assert out.dtype == x_in.dtype
        np.testing.assert_array_equal(out, ref)
    (dx,) = jax.vjp(ops.gelu_exact, x_in)[1](g_in)
    (ref_dx,) = jax.vjp(exact_gelu_reference, x_in.astype(jnp.float32))[1](g_in.astype(jnp.float32))
    assert dx.dtype == x_in.dtype
    bound, floor = GELU_EXACT_GRAD[dtype]
    worst = rel(dx.astype(jnp.float32), ref_dx)
    print(f"gelu_exact gradient [{dtype}] vs float32 autodiff: {worst:.2e}")
    assert floor <= worst <= bound, worst
