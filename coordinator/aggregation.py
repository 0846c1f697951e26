"""Aggregation strategies for LoRA adapter updates, by name (:data:`AGGREGATORS`).

Every strategy has one signature::

    aggregate(updates: Iterable[ClientUpdate], *, current: Mapping[str, Tensor],
              config: AggregationConfig, server_state: Mapping[str, Tensor] | None = None)
        -> AggregationResult

``updates`` carry the tensors each client sent (all adapter tensors, or B only in FFA mode);
``current`` is the adapter the round started from (all tensors). The result is the full new
adapter: aggregated values for the names the updates carry, ``current`` for the rest.

Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2):
"fedavgm", "fedadam" and "fedyogi" first take the weighted FedAvg ``avg`` of exactly the tensors
the clients sent (A and B, or B only in FFA mode: they neither require nor refuse A), then use
``delta = avg - x`` (x = ``current``) as a pseudo-gradient and take one server step per tensor,
in float64 (beta = ``server_momentum``, lr = ``server_lr``)::

    fedavgm:  m = beta * m + delta                                      x += lr * m
    fedadam:  m = beta1 * m + (1 - beta1) * delta
              v = beta2 * v + (1 - beta2) * delta^2                     x += lr * m / (sqrt(v) + tau)
    fedyogi:  m as fedadam
              v = v - (1 - beta2) * delta^2 * sign(v - delta^2)         x += lr * m / (sqrt(v) + tau)

m starts at 0 and v at tau^2, the paper's initialisation; no bias correction, as in the paper.
FedAvg, FFA and norm-clipped FedAvg take the plain server step ``x += lr * (aggregate - x)``;
with lr = 1 (the default) they return the aggregate itself, without that arithmetic, so the
default is bit-for-bit plain FedAvg. Trimmed mean, median and DP-FedAvg ignore ``server_lr``.

Server state: m and v cross rounds. A strategy takes the previous round's state
(``server_state``; None or {} starts fresh) and returns the new one in
``AggregationResult.server_state``: float32 tensors named ``"m/<tensor name>"`` and
``"v/<tensor name>"`` for the tensors the updates carry (stateless strategies take none and
return {}). The round engine stores it next to the adapter version it produced. Only that stored
float32 state ever feeds the next round, so a job resumed from storage takes exactly the steps
it would have taken without stopping. A state whose names or shapes do not match the round's
updates is refused, not silently restarted.

Memory: FedAvg, FFA, norm-clipped FedAvg, DP-FedAvg and the server optimizers consume
``updates`` one at a time and keep only running sums and a buffer to convert the next update in
(float64, two adapters' worth), so a generator of updates is never held whole: their memory does not
depend on the number of clients.
The server optimizers add their state, one (fedavgm) or two (fedadam, fedyogi) adapters' worth of
the tensors sent. Trimmed mean and median need every client's value at each coordinate: they hold
all n updates as received (n adapters' worth, float32 for our adapters), plus, one tensor at a
time, that tensor of all n updates stacked in float64 and sorted (values and int64 indices): about
``n * (adapter bytes + 28 * largest tensor's elements)`` in all. For the small preset's rank-16
LoRA (1.84 MB per update, largest tensor 24,576 elements) that is about 2.5 MB per client: 2.5 GB
at 1,000 clients (FFA: 1.6 GB); run them on consortia, not crowds, or give the coordinator the memory.
``WEIGHTED_METHODS`` names the strategies whose result depends on the weights: the round engine
must know every client's capped weight before such a result is final (``coordinator/intake.py``).

Weights: FedAvg, FFA, norm-clipped FedAvg and the server optimizers weight by ``records``.
Trimmed mean, median and DP-FedAvg are unweighted: robust statistics by definition, and
DP-FedAvg's sensitivity analysis assumes each client's clipped update counts once. Records are
reported by the clients themselves, so the round engine first caps them with
:func:`cap_weights` (``max_weight_multiple``): no client's share may exceed that multiple of an
equal share. The strategies take the weights they are given.
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
        server_lr: server learning rate lr > 0 (``fedavg``, ``ffa``, ``clipped_fedavg`` and the
            server optimizers); 1.0 keeps the plain aggregate.
        server_momentum: FedAvgM's beta, in [0, 1) (``fedavgm``).
        beta1, beta2: decay rates of m and v, in [0, 1) (``fedadam``, ``fedyogi``).
        tau: adaptivity > 0 (``fedadam``, ``fedyogi``): the step is m / (sqrt(v) + tau), and v
            starts at tau^2.
        max_weight_multiple: cap on each client's share of the total weight, as a multiple
            (>= 1) of an equal share; None leaves the weights as reported. The round engine
            applies it with :func:`cap_weights` before it builds the ``ClientUpdate`` objects.
    """

    method: str = "fedavg"
    clip_norm: float | None = None
    trim_fraction: float = 0.1
    noise_multiplier: float = 0.0
    secure_rng: bool = True
    seed: int | None = None
    server_lr: float = 1.0
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    max_weight_multiple: float | None = 1.5


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
        server_state: the server optimizer's state after this round, float32 tensors named
            ``"m/<tensor name>"`` and ``"v/<tensor name>"``; feed it to the next round's
            ``aggregate``. Empty for stateless strategies.
    """

    tensors: dict[str, torch.Tensor] = field(repr=False)
    num_clients: int
    total_weight: float
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    clipped_clients: tuple[str, ...] = ()
    server_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


class Aggregator(Protocol):
    def __call__(self, updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                 config: AggregationConfig,
                 server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult: ...


class AggregationError(ValueError):
    """Updates or config that a strategy cannot aggregate (none, mismatched names, bad settings)."""


# ---------------------------------------------------------------------------------------------
# Running sums (streamed strategies)


class _RunningSum:
    """Sum of weighted tensors in float64, checked to carry the same names in every update.

    An update that is not float64 is converted in a buffer kept for the next one (one adapter's
    worth): a fresh float64 copy per update costs more in page faults than the addition."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] | None = None
        self._scratch: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, client_id: str, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise AggregationError(f"client {client_id!r}: weight {weight} must be positive and finite")
        if self.sums is None:
            self.sums = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in tensors.items()}
            self._scratch = {name: torch.empty(t.shape, dtype=torch.float64) for name, t in tensors.items()}
        elif tensors.keys() != self.sums.keys():
            raise AggregationError(f"client {client_id!r} sent tensors {sorted(tensors)[:3]}..., others sent "
                                   f"{sorted(self.sums)[:3]}...")
        for name, t in tensors.items():
            value = t if t.dtype == torch.float64 else self._scratch[name].copy_(t)  # exact: float64 holds it
            self.sums[name].add_(value, alpha=weight)
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


def _require_server_lr(config: AggregationConfig) -> float:
    if not (math.isfinite(config.server_lr) and config.server_lr > 0):
        raise AggregationError(f"server_lr {config.server_lr} must be positive and finite")
    return config.server_lr


def _current64(current: Mapping[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """``current[name]`` in float64, checked to exist and to have the update's shape (no broadcasting)."""
    if name not in current:
        raise AggregationError(f"updates carry tensor {name!r} the adapter does not have")
    if current[name].shape != shape:
        raise AggregationError(f"updates carry {name!r} of shape {list(shape)}, the adapter "
                               f"{list(current[name].shape)}")
    return current[name].to(torch.float64)


def _server_sgd(current: Mapping[str, torch.Tensor], new64: dict[str, torch.Tensor],
                config: AggregationConfig) -> dict[str, torch.Tensor]:
    """``x + lr * (new - x)`` per tensor; with lr = 1, ``new`` itself (bit-for-bit the aggregate)."""
    lr = _require_server_lr(config)
    if lr == 1.0:
        return new64
    stepped = {}
    for name, value in new64.items():
        x = _current64(current, name, value.shape)
        stepped[name] = x + lr * (value - x)
    return stepped


# ---------------------------------------------------------------------------------------------
# Strategies


def aggregate_fedavg(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                     config: AggregationConfig,
                     server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """Weighted FedAvg: ``sum_i w_i x_i / sum_i w_i`` for every tensor sent (A and B alike), then
    the server step ``x + server_lr * (average - x)`` (the average itself at server_lr = 1).

    On plain LoRA this averages A and B separately, which is not the average of the clients'
    products B_i A_i (see ``aggregate_ffa``). Takes no server state."""
    running = _RunningSum()
    for update in updates:
        running.add(update.client_id, update.tensors, update.weight)
    sums = running.require()
    averaged = {name: s / running.total_weight for name, s in sums.items()}
    return AggregationResult(_merge(current, _server_sgd(current, averaged, config)), running.count,
                             running.total_weight)


def aggregate_ffa(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                  config: AggregationConfig,
                  server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """FFA-LoRA: weighted FedAvg of the B matrices only; A stays frozen at ``current``.

    With A shared and fixed, ``mean_i(B_i) A = mean_i(B_i A)`` exactly: averaging B averages
    the clients' weight deltas. An update carrying an A tensor is refused. ``server_lr`` applies
    as in ``aggregate_fedavg``; takes no server state. (The server optimizers also run on FFA
    updates: they aggregate whatever tensors are sent.)
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
                             config: AggregationConfig,
                             server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """Weighted FedAvg of updates clipped to norm C: ``current + sum_i w_i clip(x_i - current) / sum_i w_i``,
    then the server step as in ``aggregate_fedavg``. Takes no server state."""
    clip_norm = _require_clip_norm(config)
    running, clipped = _RunningSum(), []
    for update in updates:
        delta, was_clipped = _clip(_delta(update.tensors, current), clip_norm)
        if was_clipped:
            clipped.append(update.client_id)
        running.add(update.client_id, delta, update.weight)
    sums = running.require()
    new = {name: current[name].to(torch.float64) + s / running.total_weight for name, s in sums.items()}
    return AggregationResult(_merge(current, _server_sgd(current, new, config)), running.count, running.total_weight,
                             clip_norm=clip_norm, clipped_clients=tuple(clipped))


def _per_coordinate(updates: Iterable[ClientUpdate],
                    reduce: Callable[[torch.Tensor, int], torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """``reduce(stacked, n)`` of every tensor, where ``stacked`` is that tensor of all n updates,
    ``[n, *shape]`` float64. Holds every update (n adapters as received) and, one tensor at a time,
    its float64 stack and what ``reduce`` makes of it (a sort: values and indices)."""
    updates = list(updates)
    if not updates:
        raise AggregationError("no updates to aggregate")
    names = updates[0].tensors.keys()
    for update in updates[1:]:
        if update.tensors.keys() != names:
            raise AggregationError(f"client {update.client_id!r} sent other tensor names than "
                                   f"{updates[0].client_id!r}")
    n = len(updates)
    reduced = {}
    for name in names:
        stacked = torch.stack([u.tensors[name] for u in updates]).to(torch.float64)  # [n, *shape]
        reduced[name] = reduce(stacked, n)
        del stacked
    return reduced, n


def aggregate_trimmed_mean(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                           config: AggregationConfig,
                           server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """Coordinate-wise trimmed mean: per coordinate, drop the k = floor(trim_fraction * n) smallest
    and k largest values and average the rest (unweighted). Holds all updates in memory (the bound
    is in the module docstring). Ignores ``server_lr`` and takes no server state."""
    if not 0 <= config.trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction {config.trim_fraction} must be in [0, 0.5)")

    def trim(stacked: torch.Tensor, n: int) -> torch.Tensor:
        k = math.floor(config.trim_fraction * n)
        return torch.sort(stacked, dim=0).values[k:n - k].mean(dim=0)  # [*shape]

    trimmed, n = _per_coordinate(updates, trim)
    return AggregationResult(_merge(current, trimmed), n, float(n))


def aggregate_median(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                     config: AggregationConfig,
                     server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """Coordinate-wise median (the mean of the two middle values when n is even; unweighted).
    Holds all updates in memory (the bound is in the module docstring). Ignores ``server_lr`` and
    takes no server state."""
    def middle(stacked: torch.Tensor, n: int) -> torch.Tensor:
        return torch.sort(stacked, dim=0).values[(n - 1) // 2:n // 2 + 1].mean(dim=0)  # [*shape]

    medians, n = _per_coordinate(updates, middle)
    return AggregationResult(_merge(current, medians), n, float(n))


def aggregate_dp_fedavg(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                        config: AggregationConfig,
                        server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """Client-level DP-FedAvg (McMahan et al. 2018, fixed clipping):
    ``current + (sum_i clip_C(x_i - current) + N(0, (sigma C)^2 I)) / n``.

    Each client's update has sensitivity C on the sum; the noise std on the mean is sigma*C/n.
    The result carries sigma so the coordinator accounts client-level epsilon with
    :func:`client_level_epsilon` (sample rate = selected / eligible clients).

    Noise: the OS CSPRNG with ``secure_rng`` (the default), else a ``torch.Generator`` seeded
    with ``config.seed``. Ignores ``server_lr`` and takes no server state.
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


# ---------------------------------------------------------------------------------------------
# Server optimizers (FedOpt, Reddi et al. 2021, Algorithm 2)

_Slots = dict[str, torch.Tensor]  # one tensor's optimizer state by slot name ("m", "v"), float64


@dataclass(frozen=True)
class _ServerOptimizer:
    """A server optimizer: where its slots start and one step on a tensor's pseudo-gradient.

    ``initial(config)`` checks the settings the optimizer reads and returns each slot's starting
    value; ``step(delta, slots, config)`` returns the direction d (x += server_lr * d) and the
    new slots."""

    initial: Callable[[AggregationConfig], dict[str, float]]
    step: Callable[[torch.Tensor, _Slots, AggregationConfig], tuple[torch.Tensor, _Slots]]


def _require_decay(config: AggregationConfig, name: str) -> float:
    value = getattr(config, name)
    if not 0 <= value < 1:  # also refuses NaN
        raise AggregationError(f"{name} {value} must be in [0, 1)")
    return value


def _fedavgm_initial(config: AggregationConfig) -> dict[str, float]:
    _require_decay(config, "server_momentum")
    return {"m": 0.0}


def _fedavgm_step(delta: torch.Tensor, slots: _Slots, config: AggregationConfig) -> tuple[torch.Tensor, _Slots]:
    m = config.server_momentum * slots["m"] + delta
    return m, {"m": m}


def _adaptive_initial(config: AggregationConfig) -> dict[str, float]:
    _require_decay(config, "beta1")
    _require_decay(config, "beta2")
    if not (math.isfinite(config.tau) and config.tau > 0):
        raise AggregationError(f"tau {config.tau} must be positive and finite")
    return {"m": 0.0, "v": config.tau ** 2}  # v0 = tau^2 as in the paper: the first steps stay bounded


def _fedadam_step(delta: torch.Tensor, slots: _Slots, config: AggregationConfig) -> tuple[torch.Tensor, _Slots]:
    m = config.beta1 * slots["m"] + (1 - config.beta1) * delta
    v = config.beta2 * slots["v"] + (1 - config.beta2) * delta * delta
    return m / (v.sqrt() + config.tau), {"m": m, "v": v}


def _fedyogi_step(delta: torch.Tensor, slots: _Slots, config: AggregationConfig) -> tuple[torch.Tensor, _Slots]:
    # Yogi moves v towards delta^2 by a fixed (1 - beta2) * delta^2, not by a share of the gap: v
    # grows as fast as Adam's but shrinks slowly, so one small pseudo-gradient cannot blow up the step.
    m = config.beta1 * slots["m"] + (1 - config.beta1) * delta
    square = delta * delta
    v = slots["v"] - (1 - config.beta2) * square * torch.sign(slots["v"] - square)
    return m / (v.sqrt() + config.tau), {"m": m, "v": v}


_SERVER_OPTIMIZERS: dict[str, _ServerOptimizer] = {
    "fedavgm": _ServerOptimizer(_fedavgm_initial, _fedavgm_step),
    "fedadam": _ServerOptimizer(_adaptive_initial, _fedadam_step),
    "fedyogi": _ServerOptimizer(_adaptive_initial, _fedyogi_step),
}


def _load_server_state(server_state: Mapping[str, torch.Tensor] | None, shapes: Mapping[str, torch.Size],
                       initial: Mapping[str, float]) -> dict[str, _Slots]:
    """Each sent tensor's slots in float64: from ``server_state``, or fresh when it is None or {}.

    A non-empty state must hold exactly ``"<slot>/<name>"`` for every slot and sent tensor, with
    the tensor's shape: a state from another method or other tensors is refused, not restarted."""
    if not server_state:
        return {name: {slot: torch.full(tuple(shape), value, dtype=torch.float64) for slot, value in initial.items()}
                for name, shape in shapes.items()}
    expected = {f"{slot}/{name}": (slot, name) for name in shapes for slot in initial}
    unexpected = sorted(set(server_state) - set(expected))
    if unexpected:
        raise AggregationError(f"server_state holds {unexpected[:3]}, which this round's updates do not use "
                               f"(expected {sorted(expected)[:3]}...)")
    slots: dict[str, _Slots] = {name: {} for name in shapes}
    for key, (slot, name) in expected.items():
        if key not in server_state:
            raise AggregationError(f"server_state lacks {key!r} (it comes from another method or other tensors)")
        value = server_state[key]
        if value.shape != shapes[name]:
            raise AggregationError(f"server_state {key!r} has shape {list(value.shape)}, the update "
                                   f"{list(shapes[name])}")
        if not bool(torch.isfinite(value).all()):
            raise AggregationError(f"server_state {key!r} holds non-finite values")
        slots[name][slot] = value.to(torch.float64)
    return slots


def _aggregate_with_server_optimizer(updates: Iterable[ClientUpdate], current: Mapping[str, torch.Tensor],
                                     config: AggregationConfig, server_state: Mapping[str, torch.Tensor] | None,
                                     optimizer: _ServerOptimizer) -> AggregationResult:
    """Weighted FedAvg of the tensors sent, then one ``optimizer`` step on ``delta = avg - current``."""
    initial = optimizer.initial(config)
    lr = _require_server_lr(config)
    running = _RunningSum()
    for update in updates:
        running.add(update.client_id, update.tensors, update.weight)
    sums = running.require()
    slots = _load_server_state(server_state, {name: s.shape for name, s in sums.items()}, initial)
    new, new_state = {}, {}
    for name, s in sums.items():
        x = _current64(current, name, s.shape)
        direction, slots_after = optimizer.step(s / running.total_weight - x, slots[name], config)
        new[name] = x + lr * direction
        for slot, value in slots_after.items():
            new_state[f"{slot}/{name}"] = value.to(torch.float32)
    return AggregationResult(_merge(current, new), running.count, running.total_weight, server_state=new_state)


def aggregate_fedavgm(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                      config: AggregationConfig,
                      server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """FedAvgM: weighted FedAvg, then server momentum ``m = server_momentum * m + delta``,
    ``x += server_lr * m``. State: ``"m/<name>"``."""
    return _aggregate_with_server_optimizer(updates, current, config, server_state, _SERVER_OPTIMIZERS["fedavgm"])


def aggregate_fedadam(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                      config: AggregationConfig,
                      server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """FedAdam: weighted FedAvg, then an Adam step without bias correction (module docstring).
    State: ``"m/<name>"``, ``"v/<name>"``."""
    return _aggregate_with_server_optimizer(updates, current, config, server_state, _SERVER_OPTIMIZERS["fedadam"])


def aggregate_fedyogi(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
                      config: AggregationConfig,
                      server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """FedYogi: weighted FedAvg, then a Yogi step (module docstring). State: ``"m/<name>"``, ``"v/<name>"``."""
    return _aggregate_with_server_optimizer(updates, current, config, server_state, _SERVER_OPTIMIZERS["fedyogi"])


# Strategies whose result depends on the clients' weights (the others are unweighted by definition).
WEIGHTED_METHODS = frozenset({"fedavg", "ffa", "clipped_fedavg", "fedavgm", "fedadam", "fedyogi"})

AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": aggregate_fedavg,
    "ffa": aggregate_ffa,
    "clipped_fedavg": aggregate_clipped_fedavg,
    "trimmed_mean": aggregate_trimmed_mean,
    "median": aggregate_median,
    "dp_fedavg": aggregate_dp_fedavg,
    "fedavgm": aggregate_fedavgm,
    "fedadam": aggregate_fedadam,
    "fedyogi": aggregate_fedyogi,
}


def aggregate(updates: Iterable[ClientUpdate], *, current: Mapping[str, torch.Tensor],
              config: AggregationConfig,
              server_state: Mapping[str, torch.Tensor] | None = None) -> AggregationResult:
    """Aggregate with the strategy ``config.method`` names.

    Args:
        updates: the accepted clients' tensors and (already capped) weights; consumed once.
        current: the adapter the round started from.
        config: the job's aggregation settings.
        server_state: the previous round's ``AggregationResult.server_state``; None or {} for
            the first round. Stateless strategies ignore it.

    Returns:
        The new adapter, with the server state to store beside it.

    Raises:
        AggregationError: an unknown method, no updates, updates the strategy cannot combine,
            bad settings, or a server state that does not match the updates.
    """
    try:
        strategy = AGGREGATORS[config.method]
    except KeyError:
        raise AggregationError(f"unknown aggregation {config.method!r}; choose one of {sorted(AGGREGATORS)}") from None
    return strategy(updates, current=current, config=config, server_state=server_state)


# ---------------------------------------------------------------------------------------------
# Weights


def cap_weights(weights: Mapping[str, float], max_multiple: float | None) -> dict[str, float]:
    """Cap every client's share of the total weight at ``max_multiple`` equal shares.

    Weights are record counts the clients report; one client claiming 10^12 records would
    otherwise be the whole average. With K clients, the result has ``w_i / sum(w) <= max_multiple / K``
    for every i: weights above a cap c are lowered to c, the others are kept. c is the fixed point
    ``c = max_multiple * sum(capped weights) / K``; lowering weights lowers the sum and so c, which
    can bring further clients above it, so c is found by water-filling: with the set S capped so
    far, ``c = max_multiple * sum(w_i, i not in S) / (K - max_multiple * |S|)``; add every client
    above c to S and repeat until none is. (For max_multiple >= 1 the denominator stays positive;
    should rounding make it <= 0, every client ends equal, at the smallest weight.)

    Args:
        weights: each client's weight (positive, finite).
        max_multiple: the cap, in equal shares (>= 1); None, or >= K (no share can exceed it),
            returns the weights unchanged.

    Returns:
        The capped weights, same keys and order.

    Raises:
        AggregationError: a weight that is not positive and finite, or max_multiple < 1 or not finite.
    """
    if max_multiple is not None and not (math.isfinite(max_multiple) and max_multiple >= 1):
        raise AggregationError(f"max_weight_multiple {max_multiple} must be finite and >= 1 (or None: no cap)")
    for client_id, weight in weights.items():
        if not (math.isfinite(weight) and weight > 0):
            raise AggregationError(f"client {client_id!r}: weight {weight} must be positive and finite")
    k = len(weights)
    if max_multiple is None or max_multiple >= k:
        return dict(weights)
    capped: set[str] = set()
    while True:
        room = k - max_multiple * len(capped)
        if room <= 0:
            lowest = min(weights.values())
            return {client_id: lowest for client_id in weights}
        cap = max_multiple * sum(w for client_id, w in weights.items() if client_id not in capped) / room
        above = {client_id for client_id, w in weights.items() if client_id not in capped and w > cap}
        if not above:
            return {client_id: cap if client_id in capped else w for client_id, w in weights.items()}
        capped |= above


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
