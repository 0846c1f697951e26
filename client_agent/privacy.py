"""Record-level differential privacy: the (epsilon, delta) accounting and the randomness DP-SGD draws.

Accounting goes through Opacus' accountants (RDP by default, PRV selectable): `calibrate_noise`
finds the noise multiplier for a target epsilon, `epsilon_for` says what (q, sigma, steps) spends,
and `plan_privacy` fixes both before a run, so that a lifetime budget can be checked before any
record is touched (docs/dp_lora.md). A federated job's `target_epsilon` is what its rounds spend
together: `plan_job_round` calibrates each round's noise against the job's earlier rounds
(composed exactly, `fedtune.compliance.accounting`) and the rounds still to come.

The randomness of DP-SGD (which records a Poisson batch holds, the Gaussian noise) must be secret:
it is never drawn from the job's seed. `SecureRandom` reads the OS CSPRNG (what Opacus'
`secure_mode` gets from torchcsprng, which has no build for this torch) and uses Opacus'
floating-point-attack-resistant noise formula; `SeededRandom` is a fast PRNG seeded from the OS
(or, for tests only, from a given seed).
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import Sampler

from fedtune.compliance.accounting import AccountingError, Mechanism, calibrate_composed_noise, composed_epsilon

ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "ghost")


class PrivacyError(ValueError):
    """A privacy configuration or plan that cannot be honoured; the message has the numbers."""


class JobBudgetExhausted(PrivacyError):
    """A job's earlier rounds on this dataset already spend the job's whole target epsilon."""


@dataclass(frozen=True)
class PrivacyConfig:
    """What the owner of the data allows one run to spend, and how DP-SGD is run.

    Attributes:
        target_epsilon, delta: the (epsilon, delta) the run may spend at most.
        max_grad_norm: per-record gradient clipping bound C.
        accountant: "rdp" (default) or "prv".
        secure_mode: draw sampling and noise from the OS CSPRNG with the attack-resistant noise
            formula (on in production).
        noise_multiplier: use this sigma instead of calibrating one; refused if it would spend
            more than target_epsilon.
        grad_sample_mode: "hooks" (per-sample gradients) or "ghost" (ghost clipping: two
            backward passes, per-sample norms only; less memory).
        enabled: False trains without DP (baselines only: nothing is clipped, nothing noised).
        dp_seed: seed for sampling and noise, for tests and debugging only; never with secure_mode.
    """

    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    secure_mode: bool = False
    noise_multiplier: float | None = None
    grad_sample_mode: str = "hooks"
    enabled: bool = True
    dp_seed: int | None = None

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"accountant {self.accountant!r} is not supported; choose one of {ACCOUNTANTS}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyError(f"grad_sample_mode {self.grad_sample_mode!r} is not supported; choose one of "
                               f"{GRAD_SAMPLE_MODES}")
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise PrivacyError(f"target_epsilon must be a positive number, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise PrivacyError(f"max_grad_norm must be a positive number, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not (math.isfinite(self.noise_multiplier)
                                                      and self.noise_multiplier > 0):
            raise PrivacyError(f"noise_multiplier must be a positive number, got {self.noise_multiplier}")
        if self.secure_mode and self.dp_seed is not None:
            raise PrivacyError("dp_seed makes sampling and noise predictable; it cannot be used with secure_mode")


def epsilon_for(sample_rate: float, sigma: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon that `steps` Poisson-sampled Gaussian steps (rate q, noise multiplier sigma) spend at `delta`,
    from Opacus' accountant (PRV: its upper bound)."""
    _check_accountant(accountant)
    if steps == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(sample_rate: float, steps: int, epsilon: float, delta: float, accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus' search tolerance) with which `steps` steps at rate
    `sample_rate` spend at most `epsilon` at `delta` (Opacus' `get_noise_multiplier`).

    Raises:
        PrivacyError: no noise multiplier up to Opacus' bound reaches the target.
    """
    _check_accountant(accountant)
    try:
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=steps, accountant=accountant)
    except ValueError as e:
        raise PrivacyError(f"no noise multiplier reaches epsilon={epsilon} at delta={delta} for {steps} steps at "
                           f"sample rate {sample_rate:.4g}: {e}") from e
    return float(sigma)


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant {accountant!r} is not supported; choose one of {ACCOUNTANTS}")


@dataclass(frozen=True)
class PrivacyPlan:
    """What a DP run will spend, fixed before it starts: epsilon is the accountant's value for
    (sample_rate, noise_multiplier, steps) at delta, never above the target."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    epsilon: float
    delta: float
    accountant: str
    max_grad_norm: float
    target_epsilon: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_privacy(config: PrivacyConfig, *, sample_rate: float, steps: int) -> PrivacyPlan:
    """The noise and the epsilon of a run of `steps` steps at `sample_rate` under `config`.

    Raises:
        PrivacyError: the sample rate or steps are out of range, or the config's own
            noise_multiplier would spend more than target_epsilon.
    """
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise PrivacyError(f"a run needs at least one step, got {steps}")
    sigma = config.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(sample_rate, steps, config.target_epsilon, config.delta, config.accountant)
    epsilon = epsilon_for(sample_rate, sigma, steps, config.delta, config.accountant)
    if epsilon > config.target_epsilon:
        raise PrivacyError(f"noise multiplier {sigma} for {steps} steps at sample rate {sample_rate:.4g} spends "
                           f"epsilon={epsilon:.4f} ({config.accountant}, delta={config.delta}), more than the "
                           f"target {config.target_epsilon}")
    return PrivacyPlan(sample_rate=sample_rate, steps=steps, noise_multiplier=sigma, epsilon=epsilon,
                       delta=config.delta, accountant=config.accountant, max_grad_norm=config.max_grad_norm,
                       target_epsilon=config.target_epsilon)


def plan_job_round(config: PrivacyConfig, *, sample_rate: float, steps: int, history: Sequence[Mechanism],
                   rounds_left: int) -> PrivacyPlan:
    """One round of a federated job whose rounds together may spend ``config.target_epsilon``.

    The noise multiplier is the smallest with which the job's earlier rounds on this dataset
    (``history``), this round and the ``rounds_left - 1`` rounds after it, each ``steps`` steps at
    ``sample_rate``, compose to at most the target (at ``config.delta``). Without retries every round
    gets the same sigma as one run of all the job's steps would; a round retried after a crash is in
    the history, so the rounds after it get a little more noise and the job still meets its target.
    ``config.noise_multiplier``, when set, is used as it is and refused if the job would pass the target.

    Returns:
        The round's plan: its own epsilon (one round alone) and the noise multiplier to train with
        (pass ``dataclasses.replace(config, noise_multiplier=plan.noise_multiplier)`` to training).
    Raises:
        PrivacyError: the history already spends the target, or the noise cannot reach it.
    """
    if rounds_left < 1:
        raise PrivacyError(f"rounds_left must be >= 1, got {rounds_left}")
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise PrivacyError(f"a run needs at least one step, got {steps}")
    spent = composed_epsilon(history, config.delta, config.accountant)
    if spent >= config.target_epsilon - 1e-9:
        raise JobBudgetExhausted(f"the job's {len(history)} earlier runs on this dataset already spend epsilon="
                                 f"{spent:.4f} at delta={config.delta:g}, its whole target {config.target_epsilon}")
    sigma = config.noise_multiplier
    try:
        if sigma is None:
            sigma = calibrate_composed_noise(history, sample_rate=sample_rate, steps=steps * rounds_left,
                                             epsilon=config.target_epsilon, delta=config.delta,
                                             accountant=config.accountant)
        job_epsilon = composed_epsilon([*history, Mechanism(sample_rate, sigma, steps)], config.delta,
                                       config.accountant)
    except AccountingError as e:
        raise PrivacyError(f"the job's rounds cannot stay within epsilon={config.target_epsilon}: {e}") from e
    if job_epsilon > config.target_epsilon + 1e-9:
        raise PrivacyError(f"this round would bring the job's composed spend on this dataset to epsilon="
                           f"{job_epsilon:.4f} ({len(history)} earlier runs), past the job's target "
                           f"{config.target_epsilon}")
    return plan_privacy(dataclasses.replace(config, noise_multiplier=sigma), sample_rate=sample_rate, steps=steps)


# ---------------------------------------------------------------------------------------------
# Randomness: Poisson sampling and Gaussian noise
# ---------------------------------------------------------------------------------------------
class RandomSource(Protocol):
    def uniform(self, n: int) -> torch.Tensor: ...  # [n] float64 in [0, 1)
    def gaussian(self, shape: torch.Size, std: float, like: torch.Tensor) -> torch.Tensor: ...


class SeededRandom:
    """torch's PRNG: seeded from the OS unless a seed is given (tests). Fast, not cryptographically strong."""

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator(device="cpu").manual_seed(secrets.randbits(63) if seed is None else seed)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def gaussian(self, shape: torch.Size, std: float, like: torch.Tensor) -> torch.Tensor:
        noise = torch.normal(0.0, std, size=tuple(shape), generator=self.generator, dtype=torch.float32)
        return noise.to(device=like.device, dtype=like.dtype)


class SecureRandom:
    """The OS CSPRNG (`os.urandom`). Gaussians by Box-Muller in float64; each noise value is the sum of
    four N(0, std^2) draws halved, Opacus' `secure_mode` defence against floating-point attacks
    (Holohan & Braghin 2021, sec. 5.1, n = 2)."""

    def uniform(self, n: int) -> torch.Tensor:
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)  # 53 random bits each
        return torch.from_numpy(words.astype(np.float64) * 2.0**-53)

    def _normals(self, n: int) -> torch.Tensor:
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs]))  # 1 - u in (0, 1]: finite
        angle = 2.0 * math.pi * u[pairs:]
        return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:n]

    def gaussian(self, shape: torch.Size, std: float, like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        draws = self._normals(4 * n).view(4, n)
        noise = (draws.sum(0) / 2 * std).view(tuple(shape))
        return noise.to(device=like.device, dtype=like.dtype)


def random_source(config: PrivacyConfig) -> RandomSource:
    return SecureRandom() if config.secure_mode else SeededRandom(config.dp_seed)


class PoissonBatchSampler(Sampler[list[int]]):
    """`steps` batches; each record joins each batch independently with probability `sample_rate`
    (the sampled Gaussian mechanism the accountants assume). Batches may be empty."""

    def __init__(self, num_records: int, sample_rate: float, steps: int, source: RandomSource) -> None:
        self.num_records, self.sample_rate, self.steps, self.source = num_records, sample_rate, steps, source

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield (self.source.uniform(self.num_records) < self.sample_rate).nonzero().view(-1).tolist()


def _add_noise_from_source(self) -> None:
    """DPOptimizer.add_noise with the noise drawn from `self.noise_source` (same std, same bookkeeping)."""
    std = self.noise_multiplier * self.max_grad_norm
    for p in self.params:
        _check_processed_flag(p.summed_grad)
        noise = self.noise_source.gaussian(p.summed_grad.shape, std, p.summed_grad) if std > 0 else 0.0
        p.grad = (p.summed_grad + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


class SourcedDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (per-sample clipping) with noise from a RandomSource."""

    add_noise = _add_noise_from_source

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: RandomSource, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.noise_source = noise_source


class SourcedGhostDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping optimizer with noise from a RandomSource."""

    add_noise = _add_noise_from_source

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: RandomSource, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.noise_source = noise_source
