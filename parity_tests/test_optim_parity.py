"""The optimizer and train step against build-nanogpt's, via torch_ref: schedule, AdamW, trajectory."""

from parity_tests import checks
from parity_tests.test_flax_parity import assert_within


def test_schedule_equals_build_nanogpt_formula_at_every_step():
    assert_within(checks.schedule_vs_build_nanogpt())


def test_one_adamw_step_matches_torch_ref():
    params_after, key_bias = checks.adamw_step_flax_vs_torch_ref("odd")
    assert_within(params_after)
    assert_within(key_bias)


def test_twenty_step_trajectory_matches_torch_ref():
    assert_within(checks.trajectory_flax_vs_torch_ref("tiny", steps=20))


def test_accumulating_micro_batches_equals_one_big_batch():
    loss, params_after = checks.accumulation_equals_big_batch("odd", k=4)
    assert_within(loss)
    assert_within(params_after)
