"""Muon against torch.optim.Muon via torch_ref (muon_checks.py): the parameter groups, the Newton-Schulz iteration,
one step with its momentum buffer, a trajectory with accumulation, and one bf16 step against torch autocast."""

import pytest

from parity_tests import muon_checks
from parity_tests.test_flax_parity import assert_within


def test_muon_and_adamw_groups_match_torch_ref():
    assert_within(muon_checks.muon_groups_flax_vs_torch_ref())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_newton_schulz_matches_torch(jit):
    assert_within(muon_checks.newton_schulz_vs_torch(jit))


def test_one_muon_step_and_its_momentum_match_torch_ref():
    for m in muon_checks.muon_step_flax_vs_torch_ref():
        assert_within(m)


def test_muon_trajectory_with_accumulation_matches_torch_ref():
    for m in muon_checks.muon_trajectory_flax_vs_torch_ref():
        assert_within(m)


def test_bf16_muon_step_and_trajectory_match_torch_autocast():
    for m in muon_checks.muon_bf16_step_vs_autocast():
        assert_within(m)
