"""Composed accounting against Opacus' own accountant objects: the RDP path caches the RDP of one step per
(sigma, q), and must still return exactly what ``RDPAccountant`` returns for the same history."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant

from fedtune.compliance.accounting import Mechanism, calibrate_composed_noise, composed_epsilon

HISTORIES = [
    [Mechanism(0.125, 0.9, 20)],
    [Mechanism(0.01, 1.0, 1000)],  # NOTES.md: 2.101 at delta 1e-5
    [Mechanism(0.2, 1.3, 2), Mechanism(0.2, 0.7, 3), Mechanism(0.05, 2.5, 40)],
    [Mechanism(0.125, 0.9, 20), Mechanism(0.125, 1.1, 20), Mechanism(0.125, 0.9, 5)],  # the same (q, sigma) twice
    [Mechanism(1.0, 4.0, 1), Mechanism(0.5, 0.3, 1)],
]


def _opacus(history: list[Mechanism], delta: float) -> float:
    merged: dict[tuple[float, float], int] = {}
    for m in history:
        merged[(m.noise_multiplier, m.sample_rate)] = merged.get((m.noise_multiplier, m.sample_rate), 0) + m.steps
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    return float(accountant.get_epsilon(delta=delta))


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_composition_is_the_accountants_value_bit_for_bit(history):
    for delta in (1e-5, 1e-3):
        expected = _opacus(history, delta)
        assert composed_epsilon(history, delta) == expected
        assert composed_epsilon(list(history), delta) == expected  # again, from the cache
        # prefixes: what a job's later rounds recompose
        for n in range(1, len(history)):
            assert composed_epsilon(history[:n], delta) == _opacus(history[:n], delta)


def test_the_notes_reference_value_and_a_calibration_stay_put():
    assert composed_epsilon([Mechanism(0.01, 1.0, 1000)], 1e-5) == pytest.approx(2.101, abs=5e-4)
    history = [Mechanism(0.125, 0.9, 20)]
    sigma = calibrate_composed_noise(history, sample_rate=0.125, steps=60, epsilon=8.0, delta=1e-5)
    spent = _opacus([*history, Mechanism(0.125, sigma, 60)], 1e-5)
    assert 8.0 - 0.01 <= spent <= 8.0
