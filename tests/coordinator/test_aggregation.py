"""Aggregation strategies against values computed by hand, FFA exactness, DP-FedAvg noise."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.coordinator.aggregation import (
    AGGREGATORS,
    AggregationConfig,
    AggregationError,
    ClientUpdate,
    aggregate,
    client_level_epsilon,
    lora_b_only,
)


def _u(client: str, weight: float = 1.0, **tensors: list[float]) -> ClientUpdate:
    return ClientUpdate(client, {name: torch.tensor(v) for name, v in tensors.items()}, weight)


def _run(method: str, updates, current, **config):
    return aggregate(updates, current=current, config=AggregationConfig(method=method, **config))


def test_registry_names():
    assert set(AGGREGATORS) == {"fedavg", "ffa", "clipped_fedavg", "trimmed_mean", "median", "dp_fedavg"}
    with pytest.raises(AggregationError, match="unknown aggregation 'krum'"):
        _run("krum", [], {})


def test_fedavg_is_weighted_by_records_and_keeps_untouched_tensors():
    current = {"w": torch.zeros(2), "other": torch.tensor([9.0])}
    # (1 * [1, 2] + 3 * [5, -2]) / 4 = [16, -4] / 4
    result = _run("fedavg", [_u("a", 1, w=[1.0, 2.0]), _u("b", 3, w=[5.0, -2.0])], current)
    assert result.tensors["w"].tolist() == [4.0, -1.0]
    assert result.tensors["other"].tolist() == [9.0]
    assert result.tensors["w"].dtype == torch.float32
    assert (result.num_clients, result.total_weight) == (2, 4.0)


def test_fedavg_streams_a_generator():
    current = {"w": torch.zeros(1)}
    updates = (_u(f"c{i}", 1, w=[float(i)]) for i in range(1, 5))  # consumed once, never listed
    assert _run("fedavg", updates, current).tensors["w"].tolist() == [2.5]  # (1+2+3+4)/4


def test_clipped_fedavg_clips_each_update_delta():
    current = {"w": torch.tensor([1.0, 1.0])}
    # deltas [3, 4] (norm 5 -> scaled by 2/5 to [1.2, 1.6]) and [0.6, 0.8] (norm 1, kept)
    result = _run("clipped_fedavg", [_u("a", w=[4.0, 5.0]), _u("b", w=[1.6, 1.8])], current, clip_norm=2.0)
    assert result.tensors["w"].tolist() == pytest.approx([1.0 + 0.9, 1.0 + 1.2])
    assert result.clipped_clients == ("a",) and result.clip_norm == 2.0
    with pytest.raises(AggregationError, match="positive clip_norm"):
        _run("clipped_fedavg", [_u("a", w=[1.0, 1.0])], current)


FIVE = [_u("c1", w=[100.0, 0.0]), _u("c2", w=[1.0, 3.0]), _u("c3", w=[3.0, -50.0]), _u("c4", w=[2.0, 2.0]),
        _u("c5", w=[4.0, 1.0])]


def test_trimmed_mean_is_coordinate_wise():
    # coordinate 0: 1 2 3 4 100 -> drop 1 and 100 -> mean(2, 3, 4) = 3
    # coordinate 1: -50 0 1 2 3 -> drop -50 and 3 -> mean(0, 1, 2) = 1
    result = _run("trimmed_mean", iter(FIVE), {"w": torch.zeros(2)}, trim_fraction=0.2)
    assert result.tensors["w"].tolist() == [3.0, 1.0]
    untrimmed = _run("trimmed_mean", FIVE, {"w": torch.zeros(2)}, trim_fraction=0.0)
    assert untrimmed.tensors["w"].tolist() == pytest.approx([110 / 5, -44 / 5])


def test_median_is_coordinate_wise_and_averages_the_middle_pair():
    assert _run("median", FIVE, {"w": torch.zeros(2)}).tensors["w"].tolist() == [3.0, 1.0]
    # four clients: coordinate 0: 1 2 3 100 -> (2 + 3) / 2; coordinate 1: -50 0 2 3 -> (0 + 2) / 2
    assert _run("median", FIVE[:4], {"w": torch.zeros(2)}).tensors["w"].tolist() == [2.5, 1.0]


def test_dp_fedavg_without_noise_is_the_unweighted_mean_of_clipped_deltas():
    current = {"w": torch.zeros(2)}
    updates = [_u("a", 1, w=[3.0, 4.0]), _u("b", 100, w=[0.6, 0.8])]  # weights are ignored
    result = _run("dp_fedavg", updates, current, clip_norm=2.0, noise_multiplier=0.0)
    assert result.tensors["w"].tolist() == pytest.approx([0.9, 1.2])  # ([1.2, 1.6] + [0.6, 0.8]) / 2
    assert (result.noise_multiplier, result.clip_norm, result.clipped_clients) == (0.0, 2.0, ("a",))


@pytest.mark.parametrize("secure_rng", [False, True])
def test_dp_fedavg_noise_has_std_sigma_c_over_n(secure_rng):
    n, size, sigma, clip = 2, 40_000, 1.5, 2.0
    current = {"w": torch.zeros(size)}
    updates = [ClientUpdate(f"c{i}", {"w": torch.zeros(size)}, 1.0) for i in range(n)]
    result = _run("dp_fedavg", updates, current, clip_norm=clip, noise_multiplier=sigma, secure_rng=secure_rng,
                  seed=0)
    noise = result.tensors["w"].double()
    expected_std = sigma * clip / n  # 1.5
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
    assert abs(noise.mean().item()) < 5 * expected_std / math.sqrt(size)
    within_one_std = (noise.abs() < expected_std).double().mean().item()
    assert within_one_std == pytest.approx(0.6827, abs=0.01)  # Gaussian, not just the right variance
    again = _run("dp_fedavg", updates, current, clip_norm=clip, noise_multiplier=sigma, secure_rng=secure_rng, seed=0)
    assert torch.equal(again.tensors["w"], result.tensors["w"]) is (not secure_rng)


def test_client_level_epsilon_uses_opacus_rdp():
    # Reference measured with Opacus' RDP accountant (NOTES.md): q=0.01, sigma=1.0, 1000 steps, delta=1e-5.
    assert client_level_epsilon([(1.0, 0.01, 1000)], delta=1e-5) == pytest.approx(2.101, abs=0.002)
    assert client_level_epsilon([(1.0, 0.01, 500)] * 2, delta=1e-5) == pytest.approx(2.101, abs=0.002)
    assert client_level_epsilon([], delta=1e-5) == 0.0
    assert client_level_epsilon([(0.0, 0.5, 1)], delta=1e-5) == math.inf


def _lora_clients(n: int, *, shared_a: bool):
    g = torch.Generator().manual_seed(7)
    a0 = torch.randn(2, 5, generator=g)  # A: [r, in]
    clients = []
    for i in range(n):
        a = a0 if shared_a else a0 + torch.randn(2, 5, generator=g)
        b = torch.randn(4, 2, generator=g) * (i + 1)  # B: [out, r], heterogeneous clients
        clients.append((a, b, float(10 * (i + 1))))
    return a0, clients


def test_ffa_average_of_b_is_exactly_the_average_of_the_clients_deltas():
    a, clients = _lora_clients(3, shared_a=True)
    current = {"q.lora_A.weight": a, "q.lora_B.weight": torch.zeros(4, 2)}
    updates = [ClientUpdate(f"c{i}", lora_b_only({"q.lora_A.weight": a, "q.lora_B.weight": b}), w)
               for i, (_, b, w) in enumerate(clients)]
    result = _run("ffa", updates, current)
    total = sum(w for _, _, w in clients)
    mean_delta = sum(w * (b @ a) for _, b, w in clients) / total  # mean_i B_i A, weighted by records
    assert torch.equal(result.tensors["q.lora_A.weight"], a)  # A stays frozen
    assert torch.allclose(result.tensors["q.lora_B.weight"] @ a, mean_delta, atol=1e-6, rtol=0)


def test_plain_fedavg_of_a_and_b_is_not_the_average_of_products():
    a0, clients = _lora_clients(3, shared_a=False)
    current = {"q.lora_A.weight": a0, "q.lora_B.weight": torch.zeros(4, 2)}
    updates = [ClientUpdate(f"c{i}", {"q.lora_A.weight": a, "q.lora_B.weight": b}, w)
               for i, (a, b, w) in enumerate(clients)]
    result = _run("fedavg", updates, current)
    total = sum(w for _, _, w in clients)
    mean_delta = sum(w * (b @ a) for a, b, w in clients) / total
    product = result.tensors["q.lora_B.weight"] @ result.tensors["q.lora_A.weight"]
    assert (product - mean_delta).norm() / mean_delta.norm() > 0.05


def test_ffa_refuses_updates_that_carry_a():
    a, clients = _lora_clients(1, shared_a=True)
    current = {"q.lora_A.weight": a, "q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(AggregationError, match="FFA mode"):
        _run("ffa", [ClientUpdate("c0", {"q.lora_A.weight": a, "q.lora_B.weight": clients[0][1]}, 1.0)], current)


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_every_strategy_refuses_no_updates_and_mismatched_names(method):
    current = {"w": torch.zeros(1), "v": torch.zeros(1)}
    config = {"clip_norm": 1.0} if method in ("clipped_fedavg", "dp_fedavg") else {}
    with pytest.raises(AggregationError, match="no updates"):
        _run(method, [], current, **config)
    with pytest.raises(AggregationError):
        _run(method, [_u("a", w=[1.0]), _u("b", v=[1.0])], current, **config)
