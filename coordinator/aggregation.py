"""Aggregation strategies for LoRA adapter updates, by name (:data:`AGGREGATORS`).

Every strategy has one signature::

    aggregate(updates: Iterable[ClientUpdate], *, current: Mapping[str, Tensor],
              config: AggregationConfig) -> AggregationResult

``updates`` carry the tensors each client sent (all adapter tensors, or B only in FFA mode);
``current`` is the adapter the round started from (all tensors). The result is the full new
adapter: aggregated values for the names the updates carry, ``current`` for the rest.

Memory: FedAvg, FFA, norm-clipped FedAvg and DP-FedAvg consume ``updates`` one at a time and
keep only running sums (float64, one adapter's worth), so a generator of updates is never held
whole. Trimmed mean and median need every client's value at each coordinate: they materialize
all updates (n adapters' worth).

Weights: FedAvg, FFA and norm-clipped FedAvg weight by ``records``. Trimmed mean, median and
DP-FedAvg are unweighted: robust statistics by definition, and DP-FedAvg's sensitivity
analysis assumes each client's clipped update counts once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

# peft's tensor names (client_agent.lora writes them): "<module>.lora_A.weight", "<module>.lora_B.weight".
LORA_A_MARKER = ".lora_A."
LORA_B_MARKER = ".lora_B."


def lora_b_only(adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The B tensors of an adapter: what an FFA-mode reply carries and ``aggregate_ffa`` averages."""
    return {name: t for name, t in adapter.items() if LORA_B_MARKER in name}


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted client's tensors and its aggregation weight (records trained on)."""

    client_id: str
    tensors: Mapping[str, torch.Tensor] = field(repr=False)
    weight: float


@dataclass(frozen=True)
class AggregationConfig:
    """The job's aggregation settings.

    Attributes:
        method: a key of :data:`AGGREGATORS`.
        clip_norm: L2 bound C on each client's update ``new - current`` (``clipped_fedavg``,
            ``dp_fedavg``).
        trim_fraction: share of values cut at each end per coordinate (``trimmed_mean``).
        noise_multiplier: sigma of DP-FedAvg; noise std on the sum is sigma * C.
        secure_rng: DP-FedAvg draws noise from the OS CSPRNG (production); False uses a
            seeded ``torch.Generator`` (tests, reproducible runs only).
        seed: seed of that generator.
    """

    method: str = "fedavg"
    clip_norm: float | None = None
    trim_fraction: float = 0.1
    noise_multiplier: float = 0.0
    secure_rng: bool = True
    seed: int | None = None


@dataclass(frozen=True)
class AggregationResult:
    """The new adapter and what the coordinator records about how it was made.

    Attributes:
        tensors: the full new adapter (aggregated names replaced, the rest from ``current``).
        num_clients: updates aggregated.
        total_weight: sum of weights used (n for unweighted strategies).
        noise_multiplier, clip_norm: DP-FedAvg's sigma and C (None otherwise), for the
            client-level privacy ledger (:func:`client_level_epsilon`).
        clipped_clients: clients whose update was scaled down by clipping.
    """

    tensors: dict[str, torch.Tensor] = field(repr=False)
    num_clients: int
    total_weight: float
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    clipped_clients: tuple[str, ...] = ()


class Aggregator(Protocol):
    def __call__(self, updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                 config: AggregationConfig) -> AggregationResult: ...


class AggregationError(ValueError):
    """Updates or config that a strategy cannot aggregate (none, mismatched names, bad settings)."""


# ---------------------------------------------------------------------------------------------
# Running sums (streamed strategies)


class _RunningSum:
    """Sum of weighted tensors in float64, checked to carry the same names in every update."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, client_id: str, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise AggregationError(f"client {client_id!r}: weight {weight} must be positive and finite")
        if self.sums is None:
            self.sums = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in tensors.items()}
        elif tensors.keys() != self.sums.keys():
            raise AggregationError(f"client {client_id!r} sent tensors {sorted(tensors)[:3]}..., others sent "
                                   f"{sorted(self.sums)[:3]}...")
        for name, t in tensors.items():
            self.sums[name].add_(t.to(torch.float64), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def require(self) -> dict[str, torch.Tensor]:
        if self.sums is None:
            raise AggregationError("no updates to aggregate")
        return self.sums


def _merge(current: Mapping[str, torch.Tensor], new64: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``current`` with the aggregated names replaced, cast back to each tensor's dtype."""
    missing = sorted(set(new64) - set(current))
    if missing:
        raise AggregationError(f"updates carry tensors the adapter does not have: {missing[:5]}")
    merged = {name: t.clone() for name, t in current.items()}
    for name, value in new64.items():
        merged[name] = value.to(current[name].dtype)
    return merged


def _delta(tensors: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        return {name: t.to(torch.float64) - current[name].to(torch.float64) for name, t in tensors.items()}
    except KeyError as e:
        raise AggregationError(f"update carries tensor {e.args[0]!r} the adapter does not have") from None


def _global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum(t * t)) for t in tensors.values()))


def _clip(delta: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """Scale ``delta`` to norm at most ``clip_norm``; report whether it was scaled."""
    norm = _global_norm(delta)
    if norm <= clip_norm:
        return delta, False
    scale = clip_norm / norm
    return {name: d * scale for name, d in delta.items()}, True


def _require_clip_norm(config: AggregationConfig) -> float:
    if config.clip_norm is None or not (math.isfinite(config.clip_norm) and config.clip_norm > 0):
        raise AggregationError(f"{config.method} needs a positive clip_norm, got {config.clip_norm}")
    return config.clip_norm


# ---------------------------------------------------------------------------------------------
# Strategies


def aggregate_fedavg(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                     config: AggregationConfig) -> AggregationResult:
    """Weighted FedAvg: ``sum_i w_i x_i / sum_i w_i`` for every tensor sent (A and B alike).

    On plain LoRA this averages A and B separately, which is not the average of the clients'
    products B_i A_i (see ``aggregate_ffa``)."""
    running = _RunningSum()
    for update in updates:
        running.add(update.client_id, update.tensors, update.weight)
    sums = running.require()
    averaged = {name: s / running.total_weight for name, s in sums.items()}
    return AggregationResult(_merge(current, averaged), running.count, running.total_weight)


def aggregate_ffa(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                  config: AggregationConfig) -> AggregationResult:
    """FFA-LoRA: weighted FedAvg of the B matrices only; A stays frozen at ``current``.

    With A shared and fixed, ``mean_i(B_i) A = mean_i(B_i A)`` exactly: averaging B averages
    the clients' weight deltas. An update carrying an A tensor is refused.
    """
    def b_only(updates: Iterable[ClientUpdate]) -> Iterable[ClientUpdate]:
        for update in updates:
            a_names = [name for name in update.tensors if LORA_A_MARKER in name]
            if a_names:
                raise AggregationError(f"FFA mode: client {update.client_id!r} sent A tensors {a_names[:3]} "
                                       f"(A is frozen; only B is aggregated)")
            yield update

    return aggregate_fedavg(b_only(updates), current=current, config=config)


def aggregate_clipped_fedavg(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                             config: AggregationConfig) -> AggregationResult:
    """Weighted FedAvg of updates clipped to norm C: ``current + sum_i w_i clip(x_i - current) / sum_i w_i``."""
    clip_norm = _require_clip_norm(config)
    running, clipped = _RunningSum(), []
    for update in updates:
        delta, was_clipped = _clip(_delta(update.tensors, current), clip_norm)
        if was_clipped:
            clipped.append(update.client_id)
        running.add(update.client_id, delta, update.weight)
    sums = running.require()
    new = {name: current[name].to(torch.float64) + s / running.total_weight for name, s in sums.items()}
    return AggregationResult(_merge(current, new), running.count, running.total_weight,
                             clip_norm=clip_norm, clipped_clients=tuple(clipped))


def _stack(updates: Iterable[ClientUpdate]) -> tuple[dict[str, torch.Tensor], int]:
    """All updates stacked per tensor: ``[n, *shape]`` float64 (holds n adapters in memory)."""
    updates = list(updates)
    if not updates:
        raise AggregationError("no updates to aggregate")
    names = updates[0].tensors.keys()
    for update in updates[1:]:
        if update.tensors.keys() != names:
            raise AggregationError(f"client {update.client_id!r} sent other tensor names than "
                                   f"{updates[0].client_id!r}")
    stacked = {name: torch.stack([u.tensors[name].to(torch.float64) for u in updates]) for name in names}
    return stacked, len(updates)


def aggregate_trimmed_mean(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                           config: AggregationConfig) -> AggregationResult:
    """Coordinate-wise trimmed mean: per coordinate, drop the k = floor(trim_fraction * n) smallest
    and k largest values and average the rest (unweighted). Holds all updates in memory."""
    if not 0 <= config.trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction {config.trim_fraction} must be in [0, 0.5)")
    stacked, n = _stack(updates)
    k = math.floor(config.trim_fraction * n)
    trimmed = {name: torch.sort(s, dim=0).values[k:n - k].mean(dim=0) for name, s in stacked.items()}  # [*shape]
    return AggregationResult(_merge(current, trimmed), n, float(n))


def aggregate_median(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                     config: AggregationConfig) -> AggregationResult:
    """Coordinate-wise median (the mean of the two middle values when n is even; unweighted).
    Holds all updates in memory."""
    stacked, n = _stack(updates)
    middle = {name: torch.sort(s, dim=0).values[(n - 1) // 2:n // 2 + 1].mean(dim=0) for name, s in stacked.items()}
    return AggregationResult(_merge(current, middle), n, float(n))


def aggregate_dp_fedavg(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                        config: AggregationConfig) -> AggregationResult:
    """Client-level DP-FedAvg (McMahan et al. 2018, fixed clipping):
    ``current + (sum_i clip_C(x_i - current) + N(0, (sigma C)^2 I)) / n``.

    Each client's update has sensitivity C on the sum; the noise std on the mean is sigma*C/n.
    The result carries sigma so the coordinator accounts client-level epsilon with
    :func:`client_level_epsilon` (sample rate = selected / eligible clients).

    Noise: the OS CSPRNG with ``secure_rng`` (the default), else a ``torch.Generator`` seeded
    with ``config.seed``.
    """
    clip_norm = _require_clip_norm(config)
    sigma = config.noise_multiplier
    if not (math.isfinite(sigma) and sigma >= 0):
        raise AggregationError(f"noise_multiplier {sigma} must be finite and >= 0")
    running, clipped = _RunningSum(), []
    for update in updates:
        delta, was_clipped = _clip(_delta(update.tensors, current), clip_norm)
        if was_clipped:
            clipped.append(update.client_id)
        running.add(update.client_id, delta, 1.0)
    sums = running.require()
    std = sigma * clip_norm
    noise = _secure_gaussian if config.secure_rng else _seeded_gaussian(config.seed)
    new = {}
    for name in sorted(sums):
        noisy_sum = (sums[name] + noise(sums[name].shape, std)) if std > 0 else sums[name]
        new[name] = current[name].to(torch.float64) + noisy_sum / running.count
    return AggregationResult(_merge(current, new), running.count, float(running.count), noise_multiplier=sigma,
                             clip_norm=clip_norm, clipped_clients=tuple(clipped))


def _seeded_gaussian(seed: int | None) -> Callable[[torch.Size, float], torch.Tensor]:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def draw(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.normal(0.0, std, size=tuple(shape), generator=generator, dtype=torch.float64)

    return draw


def _secure_gaussian(shape: torch.Size, std: float) -> torch.Tensor:
    """Gaussian noise from the OS CSPRNG (Box-Muller on 53-bit uniforms).

    As Opacus' secure mode does, the result is the sum of 4 draws divided by 2 (same variance):
    it blurs the floating-point artefacts of a single draw that can leak the unnoised value
    (Mironov, CCS 2012)."""
    n = math.prod(shape)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(4):
        total += _box_muller(n)
    return (total / 2 * std).reshape(tuple(shape))


def _box_muller(n: int) -> torch.Tensor:
    pairs = (n + 1) // 2
    raw = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64).view(2, pairs)
    # 53 random bits -> uniform in (0, 1]; never 0, so the log is finite.
    u = ((raw >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(1.0).div_(2.0 ** 53)
    radius = torch.sqrt(-2.0 * torch.log(u[0]))
    angle = 2.0 * math.pi * u[1]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": aggregate_fedavg,
    "ffa": aggregate_ffa,
    "clipped_fedavg": aggregate_clipped_fedavg,
    "trimmed_mean": aggregate_trimmed_mean,
    "median": aggregate_median,
    "dp_fedavg": aggregate_dp_fedavg,
}


def aggregate(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
              config: AggregationConfig) -> AggregationResult:
    """Aggregate with the strategy ``config.method`` names.

    Raises:
        AggregationError: an unknown method, no updates, or updates the strategy cannot combine.
    """
    try:
        strategy = AGGREGATORS[config.method]
    except KeyError:
        raise AggregationError(f"unknown aggregation {config.method!r}; choose one of {sorted(AGGREGATORS)}") from None
    return strategy(updates, current=current, config=config)


def client_level_epsilon(history: Iterable[tuple[float, float, int]], *, delta: float) -> float:
    """Client-level epsilon of a job's DP-FedAvg rounds, by Opacus' RDP accountant.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` per accounting period, e.g. one entry
            per round with sample_rate = selected / eligible clients and steps = 1.
        delta: the client-level delta.

    Returns:
        The epsilon spent over the whole history (0.0 for an empty history).
    """
    from opacus.accountants import RDPAccountant  # heavy import, only needed with DP-FedAvg

    accountant = RDPAccountant()
    for noise_multiplier, sample_rate, steps in history:
        if noise_multiplier <= 0:
            return math.inf
        accountant.history.append((noise_multiplier, sample_rate, steps))
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))
