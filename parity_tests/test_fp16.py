"""float16 against torch autocast(float16): logits, loss scale gradients, and a GradScaler trajectory whose forced
overflows both sides skip (fp16_checks.py)."""

from parity_tests import fp16_checks


def test_fp16_logits_match_torch_autocast_and_show_fp16_rounding():
    for m in fp16_checks.fp16_vs_autocast("odd"):
        print(f"{m.check}: {m.value:.2e}")
        assert m.ok, m  # measured: logits 8.4e-4, KL 1.9e-7, own fp32 run 7.4e-4 and 7.0e-4


def test_fp16_scaled_gradients_match_torch_autocast():
    for m in fp16_checks.fp16_grads_vs_autocast("tiny"):
        print(f"{m.check}: {m.value:.2e}")
        assert m.ok, m  # measured: 1.3e-3; own fp32 gradients 2.8e-4 and 2.8e-4


def test_grad_scaler_trajectory_skips_the_same_steps_as_torch():
    measurements, sides = fp16_checks.grad_scaler_trajectory()
    for m in measurements:
        print(f"{m.check}: {m.value:.2e}")
        assert m.ok, (m, sides)  # measured: losses 2.6e-5, no other skip, the same scales, AdamW count 17 both
    assert sides["flax"]["skipped"] == list(fp16_checks.FORCED)
    assert max(sides["flax"]["scale_after"]) == fp16_checks.FORCED_SCALE / 2  # backed off by x0.5
    assert 2 * 2.0**16 in sides["flax"]["scale_after"]  # grown by x2 after 3 good steps
