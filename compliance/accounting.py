"""Composed privacy accounting: what a dataset's whole history of DP-SGD runs has spent.

Shared by the agent (its local ledger, authoritative: it refuses before training) and the
coordinator (its ledger of signed spend, per client per job and lifetime), so both compute the
same number from the same rows.

A dataset's spend is the accountant's value for the concatenation of every mechanism it went
through: Poisson-sampled Gaussian steps ``(sample_rate q, noise_multiplier sigma, steps)``, composed
exactly by Opacus' RDP or PRV accountant at ONE delta for the whole budget. Summing per-run
epsilons (basic composition) is a valid bound too, but far looser: a job of R rounds then needs
more noise per round than one run of the same total steps, and each run's delta adds up until
delta, not epsilon, is what runs out.

Rows whose mechanism is unknown (written before mechanisms were recorded) cannot be composed;
they count by their own (epsilon, delta), added to the composed part (basic composition between
the two groups), so the total is never below the truth:

    spent = epsilon_acc(known history, delta_total - sum(unknown deltas)) + sum(unknown epsilons)

Mixed accountants: the RDP accountant composes any history of sampled Gaussians, so a history
whose rows name different accountants is composed with RDP (a valid bound whatever each run
planned with); a uniform history uses its own accountant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ACCOUNTANTS = ("rdp", "prv")


class AccountingError(ValueError):
    """A history or target that cannot be accounted; the message names the value."""


@dataclass(frozen=True)
class Mechanism:
    """``steps`` DP-SGD steps, each a Poisson sample at rate ``sample_rate`` with Gaussian noise of
    std ``noise_multiplier`` x the clipping bound."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise AccountingError(f"sample rate {self.sample_rate} is not in (0, 1]")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise AccountingError(f"noise multiplier {self.noise_multiplier} is not a positive number")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise AccountingError(f"steps {self.steps!r} is not a count")


@dataclass(frozen=True)
class SpendRow:
    """One recorded run: its mechanism (None when unknown) and its own (epsilon, delta)."""

    mechanism: Mechanism | None
    epsilon: float
    delta: float
    accountant: str | None = None


def composed_epsilon(history: Iterable[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the whole ``history`` composed by Opacus' ``accountant``
    (PRV: its upper bound). 0.0 for an empty history.

    Raises:
        AccountingError: unknown accountant or delta outside (0, 1).
    """
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"accountant {accountant!r} is not supported; choose one of {ACCOUNTANTS}")
    if not 0 < delta < 1:
        raise AccountingError(f"delta {delta} is not in (0, 1)")
    # The same (sigma, q) twice composes as one entry with the steps added (exact for RDP and PRV):
    # a job's rounds usually share their mechanism, so the accountant sees a few entries, not one a round.
    merged: dict[tuple[float, float], int] = {}
    for m in history:
        if m.steps > 0:
            merged[(m.noise_multiplier, m.sample_rate)] = merged.get((m.noise_multiplier, m.sample_rate), 0) + m.steps
    entries = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    if not entries:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(entries, delta)
    from opacus.accountants import create_accountant  # heavy import: only where something is accounted

    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(entries: list[tuple[float, float, int]], delta: float) -> float:
    """What Opacus' ``RDPAccountant`` with history ``entries`` (sigma, q, steps) returns from ``get_epsilon``,
    bit for bit: it sums ``compute_rdp(q, sigma, steps)``, which is the RDP of one step times ``steps``, over
    the history and converts once at ``delta``. Only the one-step RDP is cached (see `_rdp_of_one_step`)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([_rdp_of_one_step(sigma, q) * steps for sigma, q, steps in entries])
    epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one sampled-Gaussian step at the RDP accountant's orders (read-only). Its series is
    most of what accounting costs, and the same (sigma, q) comes back often: a noise calibration bisects
    over sigma with the job's earlier rounds composed at every step, and each round adds one mechanism to
    a history the round before already computed."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.flags.writeable = False
    return rdp


def history_accountant(rows: Iterable[SpendRow], default: str = "rdp") -> str:
    """The accountant a history is composed with: its own if every known row names the same one,
    else RDP (see the module docstring)."""
    names = {r.accountant for r in rows if r.mechanism is not None}
    if len(names) == 1 and next(iter(names)) in ACCOUNTANTS:
        return next(iter(names))
    return default if not names else "rdp"


def total_spend(rows: Sequence[SpendRow], delta: float, accountant: str | None = None) -> tuple[float, float]:
    """``(epsilon, delta)`` the rows spend together, at the budget's ``delta`` (module docstring).

    Returns ``(0.0, 0.0)`` for no rows. The delta returned is ``delta`` when any known mechanism
    ran (the composed part is stated at that delta), plus nothing else: the unknown rows' deltas
    are carved out of it. When the unknown rows' deltas alone reach ``delta`` the epsilon is inf.
    """
    known = [r.mechanism for r in rows if r.mechanism is not None and r.mechanism.steps > 0]
    unknown = [r for r in rows if r.mechanism is None]
    eps_unknown = sum(r.epsilon for r in unknown)
    delta_unknown = sum(r.delta for r in unknown)
    if not known:
        return eps_unknown, delta_unknown
    left = delta - delta_unknown
    if not left > 0:
        return math.inf, delta
    acc = accountant or history_accountant(rows)
    return composed_epsilon(known, left, acc) + eps_unknown, delta


def calibrate_composed_noise(history: Sequence[Mechanism], *, sample_rate: float, steps: int, epsilon: float,
                             delta: float, accountant: str = "rdp", tolerance: float = 0.01) -> float:
    """The smallest noise multiplier sigma (to within ``tolerance`` in epsilon) such that ``history``
    followed by ``steps`` steps at ``(sample_rate, sigma)`` spends at most ``epsilon`` at ``delta``.

    With ``history`` empty this is Opacus' ``get_noise_multiplier``; with the job's earlier rounds as
    history and ``steps`` = this round's steps x the rounds left, every round of a job gets the
    noise that makes all of them together meet the job's epsilon.

    Raises:
        AccountingError: the history alone already spends ``epsilon``, or no sigma up to 1e4 reaches it.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise AccountingError(f"target epsilon {epsilon} is not a positive number")
    if steps < 1:
        raise AccountingError(f"steps {steps} must be >= 1")
    already = composed_epsilon(history, delta, accountant)
    if already >= epsilon:
        raise AccountingError(f"the history already spends epsilon={already:.4g} at delta={delta:g}, the whole "
                              f"target {epsilon:g}: no noise lets another step fit")

    def spends(sigma: float) -> float:
        return composed_epsilon([*history, Mechanism(sample_rate, sigma, steps)], delta, accountant)

    low, high = 0.0, 10.0
    while spends(high) > epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise AccountingError(f"no noise multiplier up to 1e4 brings {steps} steps at sample rate "
                                  f"{sample_rate:.4g} within epsilon={epsilon} (history {already:.4g})")
    while True:  # invariant: spends(high) <= epsilon < spends(low) (low = 0 spends infinity)
        mid = (low + high) / 2
        eps = spends(mid)
        if eps > epsilon:
            low = mid
        else:
            high = mid
            if epsilon - eps < tolerance:
                return high
        if high - low < 1e-9:
            return high
