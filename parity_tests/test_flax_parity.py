"""flax_gpt against transformers and torch_ref: logits, loss, gradients, bf16, causality, transfer."""

import pytest

from parity_tests import checks
from parity_tests.checkpoints import GOOD_LAYOUTS

SHAPES = ("tiny", "odd", "deep")


def assert_within(m: checks.Measurement):
    assert m.value <= m.bound, f"{m.check}: {m.value:.3e} > bound {m.bound:.0e}"
    assert m.value >= m.floor, f"{m.check}: {m.value:.3e} < floor {m.floor:.0e} (did it run in low precision?)"


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(shape):
    assert_within(checks.logits_flax_vs_hf(shape))


@pytest.mark.parametrize("layout", GOOD_LAYOUTS)
def test_every_checkpoint_layout_loads(layout):
    assert_within(checks.logits_flax_vs_hf("odd", layout))


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_matches_transformers(shape):
    assert_within(checks.loss_flax_vs_hf(shape))


@pytest.mark.parametrize("attention", ("xla", "tiled"))
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_torch_ref(shape, attention):
    assert_within(checks.grads_flax_vs_torch_ref(shape, attention))


def test_exact_gelu_matches_torch_ref():
    """gelu="exact", nanoGPT's: logits and gradients against torch_ref's nn.GELU(), and really not the tanh GELU."""
    for m in checks.exact_gelu_flax_vs_torch_ref("odd"):  # measured logits 1.3e-6, gradients 6.9e-7, vs tanh 7.4e-4
        assert_within(m)


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_matches_torch_autocast(shape):
    """Logits and KL against torch autocast; each side's blocks' output shows bf16 rounding against its own fp32."""
    for m in checks.bf16_vs_autocast(shape):
        assert_within(m)


@pytest.mark.parametrize("attention", ("xla", "tiled"))
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_gradients_match_torch_autocast(shape, attention):
    for m in checks.bf16_grads_vs_autocast(shape, attention=attention):
        assert_within(m)


@pytest.mark.parametrize("matmul_output, remat", [("float32", False), ("compute", False), ("float32", True)])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_train_step_multiplies_in_bf16(shape, matmul_output, remat):
    """No matmul of the bf16 train step, forward or backward, takes two float32 operands."""
    assert_within(checks.bf16_dots(shape, matmul_output, remat))


def test_bf16_matmul_fallback_matches_torch_autocast_and_the_normal_path():
    """jax-mps's matmul path, forced on the CPU: bf16 dots that return bf16, cast to float32 after."""
    for m in [*checks.bf16_vs_autocast("odd", matmul_output="compute"),
              *checks.bf16_grads_vs_autocast("tiny", matmul_output="compute"),
              checks.bf16_matmul_fallback_vs_normal("odd")]:  # floor: really the other path, outputs rounded to bf16
        assert_within(m)


def test_low_precision_matmul_vjp_is_the_dot_vjp():
    """The hand-written backward of the bf16 matmul is the true one: exact against autodiff of jnp.dot in f32."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_gpt.ops import autodiff_low_precision_matmul, low_precision_matmul

    rng = np.random.default_rng(0)
    x, w, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 5, 8), (8, 3), (2, 5, 3)))
    ours = jax.vjp(low_precision_matmul, x, w)[1](g)
    with jax.default_matmul_precision("highest"):
        ref = jax.vjp(autodiff_low_precision_matmul, x, w)[1](g)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_layer_norm_and_gelu_vjps_are_autodiff_of_their_formulas():
    """The hand-written backward passes of ops.layer_norm and ops.gelu against autodiff of their formulas, the
    library's ops.autodiff_layer_norm and ops.autodiff_gelu (f32)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_gpt import ops

    rng = np.random.default_rng(0)
    x, g = (jnp.asarray(3 * rng.standard_normal((2, 5, 8)), jnp.float32) for _ in range(2))
    scale, bias = (jnp.asarray(rng.standard_normal(8), jnp.float32) for _ in range(2))
    for ours, ref, args in ((lambda *a: ops.layer_norm(*a, 1e-5), lambda *a: ops.autodiff_layer_norm(*a, 1e-5),
                             (x, scale, bias)), (ops.gelu, ops.autodiff_gelu, (x,))):
        out, vjp = jax.vjp(ours, *args)
        ref_out, ref_vjp = jax.vjp(ref, *args)
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
        for a, b in zip(vjp(g), ref_vjp(g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", checks.BF16_VJP_OPS)
def test_hand_written_backward_in_bf16_matches_float32_autodiff(op):
    assert_within(checks.bf16_vjp_vs_float32_autodiff(op))  # its floor: really ran in bf16


@pytest.mark.parametrize("shape", SHAPES)
def test_causality_later_tokens_never_change_earlier_logits(shape):
    assert_within(checks.causality(shape))


def test_causality_by_gradient():
    assert_within(checks.causality_by_gradient("odd"))


@pytest.mark.parametrize("shape", checks.PADDED_SHAPES)
def test_vocab_padding_changes_nothing(shape):
    assert_within(checks.vocab_padding_invariance(shape))


def test_vocab_padding_check_refuses_a_vocab_that_needs_no_padding():
    with pytest.raises(ValueError, match="needs no padding"):
        checks.vocab_padding_invariance("tiny")


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_flax_torch_ref_flax_is_bit_exact(shape):
    assert_within(checks.round_trip_flax_torch_flax(shape))


def test_hf_state_dict_round_trip_is_exact():
    assert_within(checks.state_dict_round_trip("deep"))


def test_jit_matches_eager():
    assert_within(checks.jit_vs_eager("odd"))


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_training_loss_equals_the_full_logits_loss(shape, dtype):
    loss, grads = checks.training_loss_vs_logits_loss(shape, dtype)
    assert_within(loss)
    assert_within(grads)


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_blocked_attention_equals_one_xla_call(dtype):
    out, grads = checks.blocked_attention_vs_xla(dtype)
    assert_within(out)
    assert_within(grads)


@pytest.mark.parametrize("T", (5, 32, 45))
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_tiled_attention_equals_one_xla_call(dtype, T):
    """Tiles of at least 8 queries, at most 4: one partial tile, four whole ones, grown to 16 with a partial last one."""
    out, grads = checks.tiled_attention_vs_xla(dtype, T)
    assert_within(out)
    assert_within(grads)


def test_remat_gives_the_same_gradients():
    assert_within(checks.remat_grads("tiny"))


@pytest.mark.parametrize("loss_chunks", (True, False))
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("shape", SHAPES)
def test_the_remat_train_step_gives_the_same_loss_and_gradients(shape, dtype, loss_chunks):
    loss, grads = checks.remat_train_grads(shape, dtype, loss_chunks)
    assert_within(loss)
    assert_within(grads)
