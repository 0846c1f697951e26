"""A federated job's epsilon is what all its rounds spend together: each round's noise is calibrated
against the job's earlier rounds and the rounds still to come. Checked against an independent RDP
computation of the concatenated history (fedtune_testing.accounting) and Opacus' own calibration."""

from __future__ import annotations

import pytest
from opacus.accountants.utils import get_noise_multiplier

from fedtune.client_agent.privacy import JobBudgetExhausted, PrivacyConfig, PrivacyError, plan_job_round
from fedtune.compliance.accounting import Mechanism
from fedtune_testing.accounting import reference_epsilon

pytestmark = pytest.mark.slow  # each plan bisects over the accountant

Q, STEPS, ROUNDS, TARGET, DELTA = 0.125, 20, 4, 8.0, 1e-5


def _run_job(config: PrivacyConfig, rounds: list[int]) -> list[Mechanism]:
    """Plan each attempt (``rounds``: the round number of each attempt, a retried round repeats)."""
    history: list[Mechanism] = []
    for number in rounds:
        plan = plan_job_round(config, sample_rate=Q, steps=STEPS, history=history, rounds_left=ROUNDS - number + 1)
        history.append(Mechanism(plan.sample_rate, plan.noise_multiplier, plan.steps))
    return history


def test_all_rounds_together_meet_the_job_target_with_the_noise_of_one_run_of_all_steps():
    history = _run_job(PrivacyConfig(target_epsilon=TARGET, delta=DELTA), [1, 2, 3, 4])
    spent = reference_epsilon([(m.sample_rate, m.noise_multiplier, m.steps) for m in history], DELTA)
    assert TARGET - 0.02 <= spent <= TARGET
    # the noise one run of all 80 steps needs (Opacus' calibration): the same sigma, round after round
    one_run = get_noise_multiplier(target_epsilon=TARGET, target_delta=DELTA, sample_rate=Q, steps=ROUNDS * STEPS,
                                   accountant="rdp")
    assert all(m.noise_multiplier == pytest.approx(one_run, rel=0.02) for m in history)
    # what splitting the target into per-round epsilons (summed) forced: more noise every round
    split = get_noise_multiplier(target_epsilon=TARGET / ROUNDS, target_delta=DELTA, sample_rate=Q, steps=STEPS,
                                 accountant="rdp")
    assert split > 1.2 * one_run


def test_a_retried_round_is_paid_by_more_noise_in_the_rounds_after_it():
    history = _run_job(PrivacyConfig(target_epsilon=TARGET, delta=DELTA), [1, 2, 2, 3, 4])  # round 2 lost once
    spent = reference_epsilon([(m.sample_rate, m.noise_multiplier, m.steps) for m in history], DELTA)
    assert spent <= TARGET
    assert history[3].noise_multiplier > history[1].noise_multiplier


def test_a_job_whose_history_spent_its_target_is_refused():
    config = PrivacyConfig(target_epsilon=1.0, delta=DELTA)
    spent = [Mechanism(Q, 0.5, 200)]
    assert reference_epsilon([(Q, 0.5, 200)], DELTA) > 1.0
    with pytest.raises(JobBudgetExhausted, match="already spend"):
        plan_job_round(config, sample_rate=Q, steps=STEPS, history=spent, rounds_left=1)


def test_a_fixed_noise_multiplier_is_refused_if_the_job_would_pass_its_target():
    config = PrivacyConfig(target_epsilon=2.0, delta=DELTA, noise_multiplier=2.0)
    history = [Mechanism(Q, 2.0, STEPS)]
    assert reference_epsilon([(Q, 2.0, STEPS)] * 2, DELTA) > 2.0 > reference_epsilon([(Q, 2.0, STEPS)], DELTA)
    with pytest.raises(PrivacyError, match="past the job's target"):
        plan_job_round(config, sample_rate=Q, steps=STEPS, history=history, rounds_left=1)
