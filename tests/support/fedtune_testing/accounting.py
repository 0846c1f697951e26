"""An independent reference for composed epsilon: the RDP of each (q, sigma, steps) from Opacus'
analysis functions (Mironov et al.'s sampled-Gaussian RDP), summed order by order over the whole
history, then converted to (epsilon, delta) once. Not the accountant objects the code under test
uses, and never a sum of per-run epsilons."""

from __future__ import annotations

from collections.abc import Iterable

from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # RDPAccountant.DEFAULT_ALPHAS


def reference_epsilon(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of the concatenated ``(sample_rate, noise_multiplier, steps)`` history."""
    total = None
    for q, sigma, steps in history:
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ALPHAS)
        total = rdp if total is None else total + rdp
    if total is None:
        return 0.0
    epsilon, _ = get_privacy_spent(orders=ALPHAS, rdp=total, delta=delta)
    return float(epsilon)
